"""RQ-VAE with nested (prefix) reconstruction, the quantizer under every learned tokenizer (DESIGN §3.1).

Each level's codebook is two tensors: ``anchors`` (K codes) and ``extensions`` (K_ext codes, empty
until ACRQ phase 2 adds them). A code index ``c < K`` names an anchor, ``c >= K`` an extension.
An item may take an extension code at a level only where its squared distance to the nearest
anchor exceeds that level's gate (``gates``, +inf until ACRQ calibrates it), and the ACRQ adapter
acts only on items that exceed some gate on the frozen path, so items the anchors serve well keep
exactly the codes they had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sa2crq.config import RQVAEConfig
from sa2crq import distributed
from sa2crq.quantize.kmeans import kmeans, squared_distances


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualAdapter(nn.Module):
    """ACRQ's residual adapter A(x). Its last layer starts at zero, so phase 2 starts exactly at the
    phase-1 model, while the first layer's non-zero activations still let the last layer learn."""

    def __init__(self, input_dim: int, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.net = mlp([input_dim, hidden, latent_dim])
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Quantized:
    codes: torch.Tensor  # (N, L) int64
    prefix_sums: torch.Tensor  # (L, N, d): z_hat_{1:m} for m = 1..L
    residuals: torch.Tensor  # (L, N, d): r_{l-1}, the input to level l
    anchor_min_dist: torch.Tensor  # (L, N): squared distance of r_{l-1} to the nearest anchor
    chosen: torch.Tensor  # (L, N, d): the code vector taken at each level


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.input_dim = input_dim
        dims = [input_dim, *config.hidden_dims, config.latent_dim]
        # Seeded here, not from the global RNG, so a tokenizer is a function of its config and data.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = mlp(dims)
            self.decoder = mlp(dims[::-1])
        self.anchors = nn.ParameterList(
            [nn.Parameter(torch.zeros(config.codebook_size, config.latent_dim)) for _ in range(config.levels)]
        )
        self.extensions = nn.ParameterList(
            [nn.Parameter(torch.zeros(0, config.latent_dim)) for _ in range(config.levels)]
        )
        self.register_buffer("gates", torch.full((config.levels,), float("inf")))
        self.register_buffer("initialised", torch.tensor(False))
        self.adapter: ResidualAdapter | None = None

    # -- structure -------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return self.config.levels

    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(a.shape[0] + e.shape[0] for a, e in zip(self.anchors, self.extensions))

    def codebook(self, level: int) -> torch.Tensor:
        return torch.cat([self.anchors[level], self.extensions[level]])

    def add_adapter(self, hidden: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 1)
            self.adapter = ResidualAdapter(self.input_dim, hidden, self.config.latent_dim).to(self.gates.device)

    def set_extensions(self, level: int, codes: torch.Tensor) -> None:
        self.extensions[level] = nn.Parameter(codes.detach().clone().to(self.gates.device))

    # -- forward ---------------------------------------------------------------------------
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z = E(x), plus the ACRQ adapter A(x) on novel items only (see :meth:`novel`)."""
        z = self.encoder(x)
        if self.adapter is None:
            return z
        return z + self.novel(z).to(z.dtype)[:, None] * self.adapter(x)

    @torch.no_grad()
    def novel(self, z: torch.Tensor) -> torch.Tensor:
        """Items the frozen manifold serves badly: on the anchors-only path from E(x), some level's
        anchor distance exceeds its gate. Every other item keeps z = E(x) and therefore exactly its
        phase-1 codes: the adapter cannot move them, however small its output."""
        residual = z
        novel = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        for level in range(self.levels):
            dist, code = squared_distances(residual, self.anchors[level]).min(1)
            novel |= dist > self.gates[level]
            residual = residual - self.anchors[level][code]
        return novel

    def quantize(self, z: torch.Tensor) -> Quantized:
        codes, sums, residuals, anchor_dists, chosen = [], [], [], [], []
        residual = z
        total = torch.zeros_like(z)
        for level in range(self.levels):
            anchors = self.anchors[level]
            dist_anchor = squared_distances(residual.detach(), anchors.detach())
            anchor_min, code = dist_anchor.min(1)
            extensions = self.extensions[level]
            if extensions.shape[0] > 0:
                ext_min, ext_code = squared_distances(residual.detach(), extensions.detach()).min(1)
                take_new = (anchor_min > self.gates[level]) & (ext_min < anchor_min)
                code = torch.where(take_new, ext_code + anchors.shape[0], code)
            vector = self.codebook(level)[code]
            residuals.append(residual)
            anchor_dists.append(anchor_min)
            chosen.append(vector)
            codes.append(code)
            total = total + vector
            sums.append(total)
            # Detached so each codebook is trained by its own level's codebook loss only.
            residual = residual - vector.detach()
        return Quantized(
            codes=torch.stack(codes, 1),
            prefix_sums=torch.stack(sums),
            residuals=torch.stack(residuals),
            anchor_min_dist=torch.stack(anchor_dists),
            chosen=torch.stack(chosen),
        )

    def nested_reconstruction(self, x: torch.Tensor, z: torch.Tensor, q: Quantized) -> torch.Tensor:
        """Per-item sum_m w_m ||x - Dec(z_hat_{1:m})||^2 with straight-through gradients to z."""
        per_item = torch.zeros(x.shape[0], device=x.device)
        for m, weight in enumerate(self.config.level_weights()):
            if weight == 0:
                continue
            z_st = z + (q.prefix_sums[m] - z).detach()
            per_item = per_item + weight * (x - self.decoder(z_st)).pow(2).sum(1)
        return per_item

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Full-depth codes (N, L) for embeddings x, in batches."""
        was_training = self.training
        self.eval()
        out = [self.quantize(self.latent(x[i : i + batch_size])).codes for i in range(0, x.shape[0], batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.levels, dtype=torch.long)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Per-item ||x - Dec(z_hat_{1:depth})||^2 (full depth by default)."""
        q = self.quantize(self.latent(x))
        return (x - self.decoder(q.prefix_sums[(depth or self.levels) - 1])).pow(2).sum(1)

    # -- codebook maintenance (identical on every rank) -------------------------------------
    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, generator: torch.Generator, max_rows: int = 65536) -> None:
        """Residual k-means on encoder outputs: one k-means on rank 0 over rows gathered from every
        rank, then broadcast, so all replicas start from the same codebooks."""
        z = distributed.gather_rows(self.latent(x), max_rows)
        for level in range(self.levels):
            centroids = self.anchors[level].data
            if distributed.rank() == 0:
                centroids.copy_(kmeans(z, centroids.shape[0], iters=self.config.kmeans_iters, generator=generator))
            distributed.broadcast_(centroids)
            z = z - centroids[squared_distances(z, centroids).argmin(1)]
        self.initialised.fill_(True)

    @torch.no_grad()
    def code_usage(self, x: torch.Tensor, batch_size: int = 65536) -> list[torch.Tensor]:
        """Per level, how many items take each code, summed over all ranks."""
        return self._global_code_counts(self.encode(x, batch_size))

    def _global_code_counts(self, codes: torch.Tensor) -> list[torch.Tensor]:
        counts = []
        for level, size in enumerate(self.codebook_sizes()):
            c = torch.bincount(codes[:, level], minlength=size).to(torch.float64)
            counts.append(distributed.all_reduce_sum_(c))
        return counts

    @torch.no_grad()
    def reset_dead_codes(
        self, x: torch.Tensor, generator: torch.Generator, *, min_count: int, anchors_frozen: bool = False
    ) -> int:
        """Move codes that fewer than ``min_count`` items use (counted over all ranks) onto residuals
        of randomly chosen local items; rank 0 draws, every rank receives the same codebook.
        Returns the number of codes reset."""
        q = self.quantize(self.latent(x))
        counts = self._global_code_counts(q.codes)
        reset = 0
        for level, count in enumerate(counts):
            dead = count < min_count
            n_anchor = self.anchors[level].shape[0]
            if anchors_frozen:
                dead[:n_anchor] = False
            n_dead = int(dead.sum())
            if n_dead == 0:
                continue
            reset += n_dead
            book = self.codebook(level).detach().clone()
            if distributed.rank() == 0 and x.shape[0] > 0:  # with no local rows rank 0 keeps the codes
                residuals = q.residuals[level]
                pick = torch.randint(residuals.shape[0], (n_dead,), generator=generator, device="cpu")
                book[dead] = residuals[pick.to(residuals.device)]
            distributed.broadcast_(book)
            self.anchors[level].data.copy_(book[:n_anchor])
            if book.shape[0] > n_anchor:
                self.extensions[level].data.copy_(book[n_anchor:])
        return reset
