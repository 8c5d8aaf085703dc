"""What one training step is: packing (`batch`), the teacher (`teacher`), the OPSD and SFT steps as
strategies the loop calls (`opsd`, `sft`), and the optimizer plumbing (`optim`)."""
