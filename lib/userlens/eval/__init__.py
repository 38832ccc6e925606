"""Offline evaluation: public datasets under published protocols, the baselines, the PII corpus."""
