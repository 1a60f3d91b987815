"""VoxBox TTS worker: Flask app served by gunicorn, one inference thread per loaded model."""
__version__ = "0.1.0"
