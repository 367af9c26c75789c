"""Measuring models: prompt adherence and image statistics against real images."""
