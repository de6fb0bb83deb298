"""CTC warm start for the adaptor: audio rows scored against the LLM's own token embeddings, no LLM forward.

Each adaptor row (begin/end rows aside) is compared with every token embedding (cosine, learned scale) plus a
learned blank; CTC on the transcript's tokens pulls rows towards the embeddings of the spoken tokens, so the LLM
later reads them almost as text. About 50x cheaper a sample than the LLM-based stage 1 on a 0.5B LLM; a warm
start for it, not a replacement (the LLM-based stages follow with `init`). The same head serves later stages as an
auxiliary loss beside the LLM's (`ctc_weight`), on the batch's ASR rows only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CTCHead(nn.Module):
    """Frozen, normalised token embeddings (V, D) + a learned blank direction and logit scale."""

    def __init__(self, embeddings: torch.Tensor, norm_weight: float = 0.1):
        super().__init__()
        emb = embeddings.detach().float()
        self.register_buffer("vocab", F.normalize(emb, dim=-1), persistent=False)  # (V, D)
        self.target_norm = float(emb.norm(dim=-1).mean())
        self.blank = nn.Parameter(torch.randn(emb.shape[1]) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # logits = e^s * cosine
        self.norm_weight = norm_weight

    def loss(self, rows: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """rows: per sample (T_i, D) audio rows without begin/end rows; targets: per sample token ids."""
        T = max(r.shape[0] for r in rows)
        D = rows[0].shape[1]
        x = rows[0].new_zeros(len(rows), T, D)
        for i, r in enumerate(rows):
            x[i, : r.shape[0]] = r
        unit = F.normalize(x.float(), dim=-1)  # (B, T, D)
        scale = self.log_scale.exp()
        logits = torch.cat([unit @ self.vocab.T, (unit @ F.normalize(self.blank, dim=0))[..., None]], -1) * scale
        log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, B, V + 1); blank = V
        blank = self.vocab.shape[0]
        ctc = F.ctc_loss(log_probs, torch.cat(targets), torch.tensor([r.shape[0] for r in rows]),
                         torch.tensor([t.numel() for t in targets]), blank=blank, zero_infinity=True)
        norms = torch.cat([r.norm(dim=-1) for r in rows]) / self.target_norm
        return ctc + self.norm_weight * ((norms - 1) ** 2).mean()  # rows keep the token embeddings' size


def ctc_rows_and_targets(model, batch, n_end: int, chunk_rows=None, samples=None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Audio rows of each sample's (single) audio part and the token ids of its assistant answer, without the
    n_end end-of-turn tokens that close it. chunk_rows: the batch's audio rows, if computed already; samples: the
    indices of the batch's ASR samples (default: every sample, each of which must be one)."""
    if chunk_rows is None:
        chunk_rows = model.audio_rows(batch.mel, batch.n_frames, batch.keys)
    rows, targets = [], []
    for i in range(len(batch.items)) if samples is None else samples:
        item = batch.items[i]
        audio = [p for p in item if p[0] == "audio"]
        labelled = [p[1][p[2] != -100] for p in item if p[0] == "text" and (p[2] != -100).any()]
        if len(audio) != 1 or not labelled:
            raise ValueError("CTC needs ASR rows: one audio part and one transcript each")
        rows.append(torch.cat([chunk_rows[c][1:-1] for c in audio[0][1]]))
        targets.append(labelled[-1][: labelled[-1].numel() - n_end])
    return rows, targets
