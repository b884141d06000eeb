"""Conditioning encoders (CLIP, Synchformer, Perception Encoder), video decoding, and `extract`.

The entry points below live in `features.py` and load lazily, so importing one encoder module does
not import all of them.
"""
_FEATURES_API = ('ENCODER_PRESETS', 'EncodersConfig', 'decode_video', 'encoders_config', 'extract',
                 'init_encoders')
__all__ = list(_FEATURES_API)


def __getattr__(name):
  if name in _FEATURES_API:
    from visaudio_jax.encoders import features
    return getattr(features, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
