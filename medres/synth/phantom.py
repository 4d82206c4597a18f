"""Geometry and pixel content of synthetic series: body phantoms, lesions, noise.

Everything here is a pure function of a :class:`~medres.synth.plan.SeriesPlan` (drawn from
the spec's seed), so ``ground_truth`` can re-render any series bit for bit without keeping
volumes around.

Coordinates: the phantom is drawn in a *local* frame in mm centred on the middle voxel,
x along columns, y along rows, z along slices. A voxel (s, r, c) sits at local
``((c - (cols-1)/2) * col_sp, (r - (rows-1)/2) * row_sp, (s - (slices-1)/2) * slice_sp)``
and at world (LPS) ``origin + c*col_sp*row_dir + r*row_sp*col_dir + s*slice_sp*normal``.

Owns: :class:`Geometry` (and its LPS/RAS affines), :class:`Lesion`, :class:`Anatomy` and the
renderers of torso, radiograph and ultrasound phantoms. Imports: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# tissue labels and their values per modality
AIR, FAT, SOFT, LUNG, LIVER, CORTEX, MARROW, VESSEL, KIDNEY, CYST = range(10)
CT_VALUES = np.array([-1000, -100, 40, -850, 60, 900, 250, 45, 35, 5], dtype=np.float32)
MR_VALUES = np.array([0, 1100, 450, 30, 600, 40, 900, 150, 500, 120], dtype=np.float32)
SOFT_VALUE = {"ct": 40.0, "nifti": 40.0, "sc": 40.0, "mr": 450.0, "xray": 0.0, "us": 110.0}
NOMINAL_CONTRAST = {
    "ct": 100.0,
    "nifti": 100.0,
    "sc": 100.0,
    "mr": 400.0,
    "xray": 900.0,
    "us": -70.0,
}
NOMINAL_NOISE = {"ct": 12.0, "nifti": 12.0, "sc": 12.0, "mr": 25.0, "xray": 40.0, "us": 0.35}


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in the patient (LPS) frame. 2D images have ``slices == 1``."""

    rows: int
    cols: int
    slices: int
    row_sp: float
    col_sp: float
    slice_sp: float
    row_dir: tuple[float, float, float]  # ImageOrientationPatient[:3], direction of +column index
    col_dir: tuple[float, float, float]  # ImageOrientationPatient[3:], direction of +row index
    origin: tuple[float, float, float]  # ImagePositionPatient of voxel (0, 0, 0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_dir), np.asarray(self.col_dir))

    def affine_lps(self) -> np.ndarray:
        """4x4 mapping array index (s, r, c, 1) -> LPS mm, matching (slices, rows, cols) arrays."""
        a = np.eye(4)
        a[:3, 0] = self.normal * self.slice_sp
        a[:3, 1] = np.asarray(self.col_dir) * self.row_sp
        a[:3, 2] = np.asarray(self.row_dir) * self.col_sp
        a[:3, 3] = self.origin
        return a

    def position(self, s: float) -> np.ndarray:
        """ImagePositionPatient of slice ``s``."""
        return np.asarray(self.origin) + s * self.slice_sp * self.normal

    def local_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Local mm (x, y, z) -> fractional voxel index (s, r, c)."""
        x, y, z = xyz
        return np.array(
            [
                z / self.slice_sp + (self.slices - 1) / 2,
                y / self.row_sp + (self.rows - 1) / 2,
                x / self.col_sp + (self.cols - 1) / 2,
            ]
        )

    def local_to_world(self, xyz: np.ndarray) -> np.ndarray:
        return (self.affine_lps() @ np.append(self.local_to_voxel(xyz), 1.0))[:3]

    def fov(self) -> tuple[float, float, float]:
        return self.cols * self.col_sp, self.rows * self.row_sp, self.slices * self.slice_sp


def lps_sr_c_to_ras_xyz(aff_src: np.ndarray) -> np.ndarray:
    """Turn an (s, r, c)->LPS affine into the (c, r, s)->RAS affine NIfTI uses."""
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1  # (c, r, s) -> (s, r, c)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff_src @ perm


@dataclass(frozen=True)
class Lesion:
    """A spherical (3D) or disc (2D) finding in local mm, with its painted value."""

    x: float
    y: float
    z: float
    radius: float
    value: float  # CT/MR/US: the value painted in the core; X-ray: added attenuation
    distractor: bool = False


@dataclass(frozen=True)
class Anatomy:
    """Per-series anatomy jitter: body size/offset and organ shifts (local mm)."""

    a: float
    b: float
    cx: float
    cy: float
    shift: tuple[float, ...] = field(default_factory=tuple)  # organ jitter, mm
    texture: float = 0.0  # amplitude of low-frequency texture
    noise: float = 0.0  # noise sd in the modality's units
    gain: float = 1.0  # MR bias / X-ray exposure / US gain factor


def rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _grids(g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = ((np.arange(g.cols) - (g.cols - 1) / 2) * g.col_sp).astype(np.float32)
    y = ((np.arange(g.rows) - (g.rows - 1) / 2) * g.row_sp).astype(np.float32)
    z = ((np.arange(g.slices) - (g.slices - 1) / 2) * g.slice_sp).astype(np.float32)
    return x, y, z


def _ellipse2d(x, y, cx, cy, a, b) -> np.ndarray:
    return ((x[None, :] - cx) / a) ** 2 + ((y[:, None] - cy) / b) ** 2


def _paint_ellipsoid(lab, x, y, z, c, semi, label, where=None) -> None:
    """Set ``lab`` to ``label`` inside an axis-aligned ellipsoid, slice by slice."""
    cx, cy, cz = c
    a, b, cz_semi = semi
    zz = ((z - cz) / cz_semi) ** 2
    ks = np.nonzero(zz < 1)[0]
    if ks.size == 0:
        return
    e2 = _ellipse2d(x, y, cx, cy, a, b)
    for k in ks:
        m = e2 < (1 - zz[k])
        if where is not None:
            m &= np.isin(lab[k], where)
        lab[k][m] = label


def body_labels(g: Geometry, an: Anatomy) -> np.ndarray:
    """Tissue-label volume (slices, rows, cols) uint8 of a torso phantom (chest above z=0)."""
    x, y, z = _grids(g)
    _, _, fz = g.fov()
    fz = max(fz, 2 * max(g.row_sp, g.col_sp))
    a, b, cx, cy = an.a, an.b, an.cx, an.cy
    s = an.shift if an.shift else (0.0,) * 6
    lab = np.zeros((g.slices, g.rows, g.cols), dtype=np.uint8)
    e_body = _ellipse2d(x, y, cx, cy, a, b)
    plane = np.where(e_body <= 1, FAT, AIR).astype(np.uint8)
    plane[e_body <= 0.88**2] = SOFT
    # aorta and spine are tubes along z
    plane[_ellipse2d(x, y, cx + 0.08 * a, cy + 0.42 * b, 0.07 * a, 0.07 * a) <= 1] = VESSEL
    vb = _ellipse2d(x, y, cx, cy + 0.62 * b, 0.14 * b, 0.14 * b)
    post = _ellipse2d(x, y, cx, cy + 0.86 * b, 0.06 * b, 0.06 * b)
    lab[:] = plane
    disc = (np.mod(z + s[5], 30.0) < 6.0)[:, None, None]
    lab[np.broadcast_to(((vb <= 1) | (post <= 1))[None], lab.shape) & ~disc] = CORTEX
    lab[np.broadcast_to((vb <= 0.75**2)[None], lab.shape) & ~disc] = MARROW
    lab[np.broadcast_to((vb <= 1)[None], lab.shape) & disc] = SOFT
    inside = (SOFT,)
    # lungs (upper half), liver and kidneys (lower half)
    for side in (-1, 1):
        _paint_ellipsoid(
            lab,
            x,
            y,
            z,
            (cx + side * 0.45 * a + s[0], cy - 0.05 * b, 0.45 * fz + s[1]),
            (0.33 * a, 0.6 * b, 0.55 * fz),
            LUNG,
            where=inside,
        )
        _paint_ellipsoid(
            lab,
            x,
            y,
            z,
            (cx + side * 0.45 * a, cy + 0.5 * b + s[2], -0.3 * fz),
            (0.13 * a, 0.2 * b, 0.2 * fz),
            KIDNEY,
            where=inside,
        )
    _paint_ellipsoid(
        lab,
        x,
        y,
        z,
        (cx - 0.4 * a + s[3], cy, -0.2 * fz + s[4]),
        (0.4 * a, 0.55 * b, 0.35 * fz),
        LIVER,
        where=inside,
    )
    return lab


def lowfreq_texture(shape: tuple[int, ...], rng: np.random.Generator, cell: int = 8) -> np.ndarray:
    """Smooth noise (unit-ish sd): coarse normal noise, linearly upsampled axis by axis (cheap)."""
    out = rng.standard_normal(tuple(max(2, n // cell + 2) for n in shape)).astype(np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = (np.arange(n, dtype=np.float32) + 0.5) * (m - 1) / n
        i0 = np.minimum(pos.astype(np.int64), m - 2)
        w = (pos - i0).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[axis] = n
        w = w.reshape(wshape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def paint_lesion(vol: np.ndarray, g: Geometry, les: Lesion, additive: bool = False) -> None:
    """Paint a soft-edged sphere (2D: disc) into ``vol`` (slices, rows, cols) in place.

    Painted (``additive=False``): the core takes ``les.value`` and the 1-voxel rim blends
    with the background. Additive (projection radiography): adds ``les.value`` times the
    chord length of a sphere, normalised to 1 at the centre.
    """
    cs, cr, cc = g.local_to_voxel(np.array([les.x, les.y, les.z]))
    r = les.radius
    lo = [
        int(np.floor(cs - r / g.slice_sp)),
        int(np.floor(cr - r / g.row_sp)),
        int(np.floor(cc - r / g.col_sp)),
    ]
    hi = [
        int(np.ceil(cs + r / g.slice_sp)) + 1,
        int(np.ceil(cr + r / g.row_sp)) + 1,
        int(np.ceil(cc + r / g.col_sp)) + 1,
    ]
    if g.slices == 1:
        lo[0], hi[0] = 0, 1
    lo = [max(0, v) for v in lo]
    hi = [min(n, v) for n, v in zip(vol.shape, hi, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return
    ks = (np.arange(lo[0], hi[0]) - cs) * (g.slice_sp if g.slices > 1 else 0.0)
    rs = (np.arange(lo[1], hi[1]) - cr) * g.row_sp
    cs_ = (np.arange(lo[2], hi[2]) - cc) * g.col_sp
    d = np.sqrt(ks[:, None, None] ** 2 + rs[None, :, None] ** 2 + cs_[None, None, :] ** 2)
    box = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if additive:
        prof = np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1))
        box += (les.value * prof).astype(vol.dtype)
    else:
        edge = max(min(g.row_sp, g.col_sp), 0.1 * r)
        p = np.clip((r - d) / edge + 0.5, 0, 1).astype(np.float32)
        box[...] = box * (1 - p) + les.value * p


def render_torso(
    g: Geometry, an: Anatomy, lesions: list[Lesion], kind: str, rng: np.random.Generator
) -> np.ndarray:
    """CT (HU) or MR (arbitrary units) float32 volume (slices, rows, cols) before quantisation."""
    lab = body_labels(g, an)
    lut = MR_VALUES if kind == "mr" else CT_VALUES
    vol = lut[lab]
    body = lab != AIR
    if an.texture > 0:
        vol += (an.texture * lowfreq_texture(vol.shape, rng)) * body
    for les in lesions:
        paint_lesion(vol, g, les)
    noise = rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(an.noise)
    if kind == "mr":
        # bias field along x, then Rician-like magnitude noise
        x, _, _ = _grids(g)
        bias = (1.0 + (an.gain - 1.0) * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)
        vol *= bias[None, None, :]
        im = rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(an.noise)
        vol = np.sqrt((vol + noise) ** 2 + im**2)
    else:
        vol += noise
    return vol


def render_xray(
    g: Geometry, an: Anatomy, lesions: list[Lesion], rng: np.random.Generator
) -> np.ndarray:
    """Chest-PA-like radiograph (1, rows, cols), values 0..4095, higher = more attenuation."""
    x, y, _ = _grids(g)
    fx, fy, _ = g.fov()
    a, b, cx, cy = an.a, an.b, an.cx, an.cy
    img = np.full((g.rows, g.cols), 150.0, dtype=np.float32)
    body = _ellipse2d(x, y, cx, cy + 0.1 * fy, a, b) <= 1
    img[body] = 1800
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= _ellipse2d(x, y, cx + side * 0.2 * fx, cy - 0.05 * fy, 0.15 * fx, 0.3 * fy) <= 1
    img[lungs & body] = 700
    img[(np.abs(x[None, :] - cx) < 0.07 * fx) & body & (y[:, None] > cy - 0.3 * fy)] = 2300
    img[(np.abs(x[None, :] - cx) < 0.03 * fx) & body] = 2700
    xn = (x[None, :] - cx) / (0.4 * fx)
    for k in range(8):
        yk = cy - 0.3 * fy + k * 0.075 * fy + (an.shift[0] if an.shift else 0.0)
        curve = yk + 0.12 * fy * xn**2
        rib = (np.abs(y[:, None] - curve) < 0.012 * fy) & body & (np.abs(xn) < 0.95)
        img[rib] += 350
    img *= an.gain
    if an.texture > 0:
        img += an.texture * lowfreq_texture(img.shape, rng) * body
    vol = img[None]
    for les in lesions:
        paint_lesion(vol, g, les, additive=True)
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(an.noise)
    return np.clip(vol, 0, 4095)


def us_sector(g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean sector mask plus depth and angle maps for an ultrasound fan (apex top centre)."""
    x, y, _ = _grids(g)
    _, fy, _ = g.fov()
    apex_y = -fy / 2 + 0.02 * fy
    dy = y[:, None] - apex_y
    dx = np.broadcast_to(x[None, :], (g.rows, g.cols))
    depth = np.sqrt(dx**2 + dy**2)
    ang = np.degrees(np.arctan2(dx, np.maximum(dy, 1e-6)))
    mask = (np.abs(ang) < 35) & (depth < 0.93 * fy) & (depth > 0.05 * fy)
    return mask, depth, ang


def render_us(
    g: Geometry, an: Anatomy, lesions: list[Lesion], rng: np.random.Generator
) -> np.ndarray:
    """Grey ultrasound image (1, rows, cols) in 0..255 with speckle, before RGB conversion."""
    x, y, _ = _grids(g)
    fx, fy, _ = g.fov()
    mask, depth, _ = us_sector(g)
    img = np.full((1, g.rows, g.cols), 110.0, dtype=np.float32)
    organ = _ellipse2d(x, y, an.cx, an.cy + 0.1 * fy, an.a, an.b)
    img[0][organ <= 1] = 135
    img[0][np.abs(organ - 1) < 0.06] = 210  # bright capsule
    vessel = _ellipse2d(x, y, an.cx - 0.15 * fx, an.cy + 0.3 * fy, 0.05 * fx, 0.03 * fy) <= 1
    img[0][vessel] = 15
    if an.texture > 0:
        img += an.texture * lowfreq_texture(img.shape, rng)
    for les in lesions:
        paint_lesion(img, g, les)
    # speckle: multiplicative Rayleigh-like noise with unit mean
    sp = np.abs(
        rng.standard_normal(img.shape, dtype=np.float32)
        + 1j * rng.standard_normal(img.shape, dtype=np.float32)
    )
    sp = 1.0 + an.noise * (sp / np.float32(np.sqrt(np.pi / 2)) - 1.0)
    img = img * sp.astype(np.float32) * an.gain * (1.0 - 0.35 * depth / fy)[None]
    img[:, ~mask] = 0
    return np.clip(img, 0, 255)


def us_overlay(rgb: np.ndarray) -> None:
    """Burn in label-independent annotations: a yellow text block and white depth ticks."""
    rows, cols, _ = rgb.shape
    h, w = max(2, rows // 16), max(4, cols // 5)
    rgb[1 : 1 + h, 1 : 1 + w] = (230, 200, 40)
    rgb[1 + h // 3 : 1 + 2 * h // 3, 2:w, :] = (40, 40, 40)  # "text" line
    for k in range(1, 9):
        r = min(rows - 1, k * rows // 9)
        rgb[r, cols - 4 : cols - 1] = 255


def sc_overlay(rgb: np.ndarray) -> None:
    """Burn in label-independent annotations: a cyan caption bar and a red scale bar."""
    rows, cols, _ = rgb.shape
    h = max(2, rows // 20)
    rgb[rows - 1 - h : rows - 1, 1 : cols // 3] = (0, 200, 220)
    rgb[1 : 1 + max(1, h // 2), cols - 1 - cols // 6 : cols - 1] = (220, 30, 30)
