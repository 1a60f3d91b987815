"""VoxCPM-1.5 through the `voxcpm` package: the engine (engine.py), its weights loader (load.py), its
continuous-batching step (batch.py) and streamed VAE decode (vae_stream.py)."""
