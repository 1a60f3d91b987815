"""VoxCPM-1.5 and VoxCPM2 through the `voxcpm` package: the 1.5 engine (engine.py) and VoxCPM2's on top of it
(voxcpm2.py, with its control prefix in control.py), their weights loader (load.py), the continuous-batching
step (batch.py) and streamed VAE decode (vae_stream.py)."""
