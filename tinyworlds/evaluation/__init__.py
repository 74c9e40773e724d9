"""Measuring world models: image metrics, action metrics, rollouts."""
