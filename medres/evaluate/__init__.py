"""Evaluation: metrics with confidence intervals, inputs, the evaluation run and the HTML report."""
