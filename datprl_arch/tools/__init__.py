"""Thin command lines over library code: ``make_lmdb`` (:mod:`datprl_arch.data.lmdb`), ``encode_descriptions``
(:mod:`datprl_arch.priors`) and ``convert_checkpoint`` (:mod:`datprl_arch.utils.checkpoint`). Nothing outside this
package imports from it."""
