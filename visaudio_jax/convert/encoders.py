"""Official conditioning-encoder checkpoints -> our params (one import point for all three).

Stable API: `load_clip` (open_clip DFN5B ViT-H/14), `load_synchformer` (its `vfeat_extractor`),
`load_perception` (PE-Spatial towers). All read `.pth` without running pickled code and
`.safetensors`, check keys and shapes strictly and infer the variant from shapes.
"""
from visaudio_jax.convert.clip import load_clip
from visaudio_jax.convert.perception import load_perception
from visaudio_jax.convert.synchformer import load_synchformer

__all__ = ['load_clip', 'load_perception', 'load_synchformer']
