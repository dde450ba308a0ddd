from contextlib import contextmanager

import torch
from torch import nn


class LitEma(nn.Module):
    """Exponential moving average of a model's trainable parameters, kept as buffers so it is checkpointed."""

    def __init__(self, model, decay=0.9999, use_num_updates=True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")  # buffer names may not contain dots
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params = []

    @torch.no_grad()
    def forward(self, model):
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus_decay * (s - p))

    def copy_to(self, model):
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters):
        self.collected_params = [p.clone() for p in parameters]

    def restore(self, parameters):
        for c, p in zip(self.collected_params, parameters):
            p.data.copy_(c.data)

    @contextmanager
    def swapped_in(self, model, context=None):
        """Use the EMA weights in `model` for the duration of the block, then put the training weights back."""
        self.store(model.parameters())
        self.copy_to(model)
        if context is not None:
            print(f"{context}: Switched to EMA weights")
        try:
            yield
        finally:
            self.restore(model.parameters())
            if context is not None:
                print(f"{context}: Restored training weights")
