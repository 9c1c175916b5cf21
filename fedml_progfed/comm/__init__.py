"""Communication between server and clients: what a message holds and how its tensors are encoded.

:mod:`fedml_progfed.comm.codecs` turns a message's float tensors into one byte
string and back (quantization, sparsification, rotation, error feedback), so
that the bytes counted are the bytes encoded.
"""
