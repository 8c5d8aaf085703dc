"""What one training step is: the strategy interface the loop calls and its output (`protocol`), packing
(`batch`), the teacher (`teacher`), the OPSD and SFT steps (`opsd`, `sft`), and the optimizer plumbing
(`optim`)."""
