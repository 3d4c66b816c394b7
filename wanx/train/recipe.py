"""The demo model's recipe: every size and hyper-parameter, with why each value was chosen."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..configs import DiTConfig, T5Config, VAEConfig


@dataclass(frozen=True)
class DemoRecipe:
    """Every size and hyper-parameter of the demo model (``full()`` ships, ``smoke()`` tests)."""

    size: int = 32
    frames: int = 17
    # VAE: the Wan 2.1 layout with one downsampling stage fewer (dim_mult (1, 2, 4): 4x spatial,
    # still 4x temporal, z=16). With the official 8x stride a 32 px frame is a 4x4 latent, an object
    # about 2x2 latent pixels, and the decoder drew squares with round corners (v2's shape ceiling:
    # 62.5% on held-out prompts); at 4x an object spans about 4x4. The DiT patch grows from 1x1 to
    # 2x2 so the DiT still sees 80 tokens. dim 16: at dim 8 every shape came out as one blob.
    vae: dict = field(default_factory=lambda: dict(version="2.1", dim=16, z_dim=16, num_res_blocks=1,
                                                   dim_mult=(1, 2, 4), temperal_downsample=(True, True)))
    vae_steps: int = 2600
    # The first part of VAE training uses the first 9 frames of each clip (3 latent frames: the
    # causal caches already reach their steady state, at about half the cost), the rest whole clips.
    vae_short_frames: int = 9
    vae_short_share: float = 0.7
    vae_batch: int = 4
    vae_lr: float = 5e-4
    vae_fg_weight: float = 8.0  # extra loss weight on (dilated) object pixels: objects are ~10% of a frame
    vae_latent_noise: float = 0.0  # 0.1 (SNR 1 at init) kept the decoder from ever reading objects
    vae_latent_l2: float = 1e-4  # keeps the mean from outgrowing that noise
    # Decoder fine-tuning with the encoder frozen (latents, hence the DiT's data, do not change):
    # whole clips only, at a lower learning rate, to sharpen what the decoder draws (corners).
    decoder_steps: int = 600
    decoder_lr: float = 2e-4
    # text encoder (umT5 layout, word-level vocabulary) and DiT
    t5: dict = field(default_factory=lambda: dict(dim=64, dim_attn=64, dim_ffn=128, num_heads=2,
                                                  num_layers=2, num_buckets=8, max_distance=16))
    dit: dict = field(default_factory=lambda: dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16,
                                                   in_dim=16, out_dim=16, dim=128, ffn_dim=512,
                                                   freq_dim=256, num_heads=4, num_layers=4))
    text_len: int = 16
    clips: int = 4096  # cached training clips (latents)
    stat_clips: int = 256  # clips for the latent statistics
    psnr_clips: int = 32  # held-out clips for the VAE's per-frame PSNR check
    dit_steps: int = 10000  # ~0.3 s each on 2 CPU cores since training stopped splitting batches per sample
    dit_batch: int = 32
    # 5e-4 until v3, 1e-3 in v4-v6. 2e-3 (v7, shipped) ended with 15-18% lower loss and took training
    # captions from 92.5% to 99.2% all-correct; 3e-3 (v8) lowered the loss ~5% more, no better shapes.
    dit_lr: float = 2e-3
    # 0 = frozen at its random initialisation (v10, shipped), as Wan trains against a frozen umT5.
    # Trained jointly at 5e-4 (v7) the encoder made each word's output depend on its neighbours
    # (the "square" token of "a blue square moving left" had cosine 0.52 to the one of "a red
    # square moving left"; 0.97 at init), and the unseen combination came out rounder: held-out
    # all-correct 87.5% -> 91.7% frozen (10 seeds: 87.5% -> 90.0%), training captions equal.
    # 1e-4 (v11): 98.3% / 87.5%.
    t5_lr: float = 0.0
    shared_fraction: float = 0.5  # share of DiT steps before the fork into two experts
    boundary: float = 0.7  # σ (= t/1000) at which the high-noise expert hands over
    shift: float = 2.0  # timestep shift used in training and shipped for sampling
    # Off (the shipped model): the low-noise expert draws σ like the shared model, restricted to
    # [0, boundary). On: σ ~ U[0, boundary), 4x more steps at σ < 0.3. Tried because the low-noise
    # expert rounds square corners (a real square noised to σ = 0.3 and denoised comes back with
    # fill ratio 0.87-0.91 instead of 0.93); it did not help (held-out all-correct 54.2% vs 58.3%).
    low_expert_uniform_sigma: bool = False
    # Extra flow-matching loss weight on latent pixels the object touches (as vae_fg_weight for the
    # VAE; they are a third of the latent pixels). Unweighted (v3) every square came out round
    # (bounding-box fill 0.79-0.85, a circle's 0.76-0.82); x5 raised it to 0.83-0.90 and, with
    # dit_lr 1e-3 (was 5e-4), x9 to 0.85-0.90 and halved the flicker (shipped model).
    dit_fg_weight: float = 8.0
    caption_dropout: float = 0.1
    # Share of the remaining captions trained with one attribute unnamed ("a square moving left"),
    # meant to make each word steer the clip on its own. Off: at 0.25 (v9, on v7's recipe) squares
    # got rounder (train all-correct 93.3% vs 99.2%, held-out 75.0% vs 87.5%).
    attribute_dropout: float = 0.0
    long_caption_share: float = 0.5
    ema_decay: float = 0.998
    warmup: int = 100
    # shipped sampling defaults
    sample_steps: int = 25
    # Chosen on training captions (bench/demo_quality.py --guide-scale G, 3 seeds; all-correct
    # 90.0 / 91.7 / 92.5 / 91.7 / 84.2 / 76.7 / 69.2% for G = 1, 1.5, 1.75, 2, 2.5, 3, 4): above ~2
    # guidance pulls squares' corners in until they read as circles.
    guide_scale: float = 1.75
    sample_fps: int = 8

    @classmethod
    def full(cls) -> "DemoRecipe":
        return cls()

    @classmethod
    def smoke(cls) -> "DemoRecipe":
        """Seconds-sized: 16 px, 5 frames, a 1-layer DiT (for tests)."""
        return cls(size=16, frames=5, vae=dict(version="2.1", dim=4, z_dim=16, num_res_blocks=1,
                                               dim_mult=(1, 2, 4), temperal_downsample=(True, True)),
                   vae_steps=4, decoder_steps=3, vae_batch=2, vae_short_frames=5,
                   t5=dict(dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1, num_buckets=8,
                           max_distance=16),
                   dit=dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, out_dim=16,
                            dim=32, ffn_dim=64, freq_dim=256, num_heads=2, num_layers=1),
                   clips=16, stat_clips=8, psnr_clips=4, dit_steps=6, dit_batch=4, warmup=2,
                   sample_steps=4)

    def vae_config(self, mean=None, std=None) -> VAEConfig:
        z = self.vae["z_dim"]
        return VAEConfig(**self.vae, latents_mean=tuple(mean) if mean is not None else (0.0,) * z,
                         latents_std=tuple(std) if std is not None else (1.0,) * z)

    def t5_config(self, vocab_size: int) -> T5Config:
        return T5Config(vocab_size=vocab_size, **self.t5)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(text_dim=self.t5["dim"], **self.dit)
