"""Training, evaluation, sampling and ablations of compiled flow models."""
