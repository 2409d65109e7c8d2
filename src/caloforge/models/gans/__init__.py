"""Adversarial families (CaloGAN, the conditional WGAN-GP) and what they share."""
