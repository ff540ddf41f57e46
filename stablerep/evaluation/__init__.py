"""Evaluation: data sets, frozen features, linear probe, few-shot, kNN, report."""
