"""The trained models used together (WorldModel) and the caches they write: tokens, latent action ids."""
