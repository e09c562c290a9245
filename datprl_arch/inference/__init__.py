"""Inference on users' images: tiled application of a network (``tiling``) and the restore logic behind
``python -m datprl_arch.restore`` (``restore``)."""
