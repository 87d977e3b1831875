"""forecast-peft: Forecast-MAE pre-training and Forecast-PEFT adaptation for Argoverse 2."""

__version__ = "0.1.0"
