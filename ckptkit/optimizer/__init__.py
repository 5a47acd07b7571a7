"""Megatron-LM optimizer state: its layout, read into canonical form, written for any layout.

:mod:`.parameters` lists a model chunk's parameters in the order Megatron optimizes them;
:mod:`.buffers` computes the distributed optimizer's flat buffers from that list (bucket
order and padding); :mod:`.distrib_optim` reads the per-rank ``distrib_optim.pt`` files
through that layout.
"""
