"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .lrn import LocalResponseNorm, local_response_norm
from .rnn import GRU, LSTM, GRUCell, LSTMCell, gru_cell, lstm_cell

__all__ = ["LocalResponseNorm", "local_response_norm", "LSTM", "GRU", "LSTMCell", "GRUCell", "lstm_cell", "gru_cell"]
