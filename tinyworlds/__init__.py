"""tinyworlds: train Genie-style world models from gameplay video.

The shape key, the one used by every shape comment and einops pattern in the code:
    B batch (clips, rollouts), T time (frames of a clip), F frames generated after a context,
    N frames of a whole video or store, C channels, H/W pixels, S patch size,
    Hp/Wp patch grid, P patches per frame (Hp * Wp), E embedding width,
    L latent (FSQ) dimensions, V token vocabulary, A number of latent actions.
A flattened product is written as one: [B*T*P]. Inside attention: R rows (B*T sequences in
space, B*P in time), Lq / Lk query / key lengths.
"""

__version__ = "0.3.15"
