"""tinyworlds: train Genie-style world models from gameplay video.

Shape key used throughout the code and its comments:
    B batch, T time (frames), C channels, H/W pixels, S patch size,
    Hp/Wp patch grid, P patches per frame (Hp * Wp), E embedding width,
    L latent (FSQ) dimensions, V token vocabulary, A number of actions.
"""

__version__ = "0.1.0"
