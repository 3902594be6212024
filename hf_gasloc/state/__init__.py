"""What is kept: the parameters' flat fp32 buffers, and the files of a checkpoint.

Every part of the engine owns its ``state_dict`` / ``load_state_dict`` /
``reset``; this package holds the buffers they share and writes and reads what
they return.
"""
