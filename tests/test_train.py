"""The demo-model trainer (wanx.train) at smoke size: learning, exact resume, export round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wanx.train.demo import run_demo
from wanx.train.dit_stage import encode_captions, flow_matching_loss, pick_captions, sample_sigmas, train_dit
from wanx.train.export import write_loss_curve
from wanx.train.latents import build_cache, latent_object_mask
from wanx.train.loop import EMA, Logger
from wanx.train.recipe import DemoRecipe
from wanx.train.vae_stage import init_vae, render_batch, train_vae, vae_loss

SMOKE = DemoRecipe.smoke()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One full smoke run (every stage) shared by the tests below."""
    root = tmp_path_factory.mktemp("demo")
    summary = run_demo(SMOKE, root / "out", root / "work", seed=0, progress=False)
    return root, summary


def test_vae_steps_reduce_loss_on_a_fixed_batch():
    from wanx.vae import WanVAE

    torch.manual_seed(0)
    vae = init_vae(WanVAE(SMOKE.vae_config()))
    video, mask, _ = render_batch(np.random.default_rng(0), 2, SMOKE)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for i in range(15):
        loss, recon = vae_loss(vae, video, mask, SMOKE, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(recon.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_vae_init_keeps_the_input_in_the_latent():
    """With PyTorch's default init a tiny VAE maps every clip to nearly the same latent (training
    then plateaus on backgrounds); init_vae must make black and white clips encode far apart."""
    from wanx.vae import WanVAE

    torch.manual_seed(0)
    black, white = -torch.ones(1, 3, 5, 16, 16), torch.ones(1, 3, 5, 16, 16)
    with torch.no_grad():
        default = WanVAE(SMOKE.vae_config())
        ours = init_vae(WanVAE(SMOKE.vae_config()))
        gap = {name: (m.encode(white) - m.encode(black)).std() / m.encode(white).std()
               for name, m in (("default", default), ("ours", ours))}
    assert gap["ours"] > 1.0 > gap["default"], gap


def test_dit_init_weights_starts_from_zero_velocity_at_the_official_scales():
    from wanx.model import WanDiT

    torch.manual_seed(0)
    dit = WanDiT(SMOKE.dit_config())
    assert dit.init_weights() is dit
    x, ctx = torch.randn(2, 16, 2, 4, 4), torch.randn(2, SMOKE.text_len, SMOKE.t5["dim"])
    with torch.no_grad():
        assert torch.equal(dit(x, torch.tensor([300.0, 900.0]), ctx), torch.zeros(2, 16, 2, 4, 4))
    assert dit.text_embedding[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    ffn = dit.blocks[0].ffn[0]  # xavier-uniform: std sqrt(2 / (fan_in + fan_out))
    assert ffn.weight.std().item() == pytest.approx((2 / sum(ffn.weight.shape)) ** 0.5, rel=0.1)
    assert not ffn.bias.any()


def test_dit_steps_reduce_loss_on_a_fixed_batch(tmp_path):
    from wanx.model import WanDiT
    from wanx.text import Tokenizer, UMT5Encoder
    from wanx.text.demo_vocab import save_demo_tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_folder(save_demo_tokenizer(tmp_path), text_len=SMOKE.text_len)
    t5 = UMT5Encoder(SMOKE.t5_config(tok.vocab_size))
    dit = WanDiT(SMOKE.dit_config()).init_weights()
    x0 = torch.randn(4, 16, 2, 2, 2)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.9])
    captions = ["a red circle moving left", "a blue square moving up", "", "a green triangle moving down"]
    opt = torch.optim.Adam([*dit.parameters(), *t5.parameters()], lr=3e-3)
    losses = []
    for _ in range(20):
        ctx = encode_captions(t5, tok, captions, SMOKE.text_len, "cpu")
        loss = flow_matching_loss(dit, x0, sigma, ctx, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_latent_object_mask_follows_the_causal_vae_grouping():
    mask = torch.zeros(1, 1, 9, 8, 8, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = True  # frame 0 alone is latent frame 0
    mask[0, 0, 5, 5, 2] = True  # frames 5..8 are latent frame 2; pixel (5, 2) is cell (1, 0)
    got = latent_object_mask(mask, temporal_stride=4, spatial_stride=4)
    want = torch.zeros(1, 1, 3, 2, 2, dtype=torch.bool)
    want[0, 0, 0, 0, 0] = want[0, 0, 2, 1, 0] = True
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="does not tile"):
        latent_object_mask(torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool), 4, 4)


def test_cached_masks_cover_the_objects_of_the_cached_clips():
    from wanx.vae import WanVAE

    recipe = DemoRecipe(**{**SMOKE.__dict__, "clips": 4})
    cache = build_cache(WanVAE(recipe.vae_config()).eval(), recipe, seed=0)
    assert cache["masks"].shape == (4, 1, *cache["latents"].shape[2:])
    share = cache["masks"].float().mean().item()
    assert 0.05 < share < 0.9, share  # each clip's object touches some latent pixels, not all


def test_weighted_flow_matching_loss_counts_only_weighted_pixels():
    from wanx.model import WanDiT

    torch.manual_seed(0)
    dit = WanDiT(SMOKE.dit_config()).eval()
    with torch.no_grad():
        dit.head.head.weight.normal_(std=0.5)  # a non-zero prediction
    x0 = torch.randn(2, 16, 2, 4, 4)
    sigma = torch.tensor([0.3, 0.8])
    ctx = torch.randn(2, SMOKE.text_len, SMOKE.t5["dim"])

    def loss(weight=None):
        with torch.no_grad():
            return flow_matching_loss(dit, x0, sigma, ctx, torch.Generator().manual_seed(3), weight).item()

    assert loss(torch.ones(2, 1, 2, 4, 4)) == pytest.approx(loss(), rel=1e-6)
    # a weight that is zero on half the pixels: the mean squared error over the other half
    half = torch.zeros(2, 1, 2, 4, 4)
    half[..., :2] = 1.0
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    s = sigma.view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        err = (dit((1 - s) * x0 + s * eps, sigma * 1000, ctx) - (eps - x0)).square()
    assert loss(half) == pytest.approx(err[..., :2].mean().item(), rel=1e-5)
    assert loss(half) != pytest.approx(loss(), rel=1e-3)


def test_caption_picking_drops_captions_and_attributes_at_the_recipe_rates():
    n = 4000
    cache = {"short": ["a blue square moving left"] * n,
             "long": ["a blue square moving left on a gray background"] * n}
    recipe = DemoRecipe(caption_dropout=0.1, long_caption_share=0.5, attribute_dropout=0.25)
    picked = pick_captions(torch.Generator().manual_seed(0), cache, torch.arange(n), recipe)
    empty = sum(c == "" for c in picked) / n
    partial = [c for c in picked if c and c not in cache["short"] + cache["long"]]
    assert abs(empty - 0.1) < 0.02
    assert abs(len(partial) / n - 0.9 * 0.25) < 0.03
    for c in partial:  # exactly one of the three words is gone, the background is kept when named
        words = set(c.split())
        assert len({"blue", "square", "left"} & words) == 2
        assert ("gray" in words) == ("background" in words)
    # Off, nothing is left out and the generator advances as it did before partial captions existed.
    off = DemoRecipe(caption_dropout=0.1, attribute_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    picked = pick_captions(gen, cache, torch.arange(64), off)
    assert set(picked) <= {"", *cache["short"][:1], *cache["long"][:1]}
    ref = torch.Generator().manual_seed(0)
    torch.rand(64, 2, generator=ref)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))


def test_sigma_sampling_respects_expert_ranges():
    g = torch.Generator().manual_seed(0)
    high = sample_sigmas(g, 256, 2.0, 0.7, 1.0)
    low = sample_sigmas(g, 256, 2.0, 0.0, 0.7)
    assert high.min() >= 0.7 and high.max() <= 1.0 and low.max() < 0.7 and low.min() >= 0.0
    allsig = sample_sigmas(g, 4096, 2.0)
    # shift 2 pushes the logit-normal's median 0.5 up to 2/3
    assert abs(allsig.median().item() - 2 / 3) < 0.03
    # the low-noise expert's uniform draw: in range, and σ < 0.3 in ~3/7 of the samples (the
    # shifted logit-normal restricted to [0, 0.7) gives ~11%)
    flat = sample_sigmas(g, 4096, 2.0, 0.0, 0.7, uniform=True)
    assert flat.min() >= 0.0 and flat.max() < 0.7
    assert abs((flat < 0.3).float().mean().item() - 3 / 7) < 0.03
    shifted_low = sample_sigmas(g, 4096, 2.0, 0.0, 0.7)
    assert (shifted_low < 0.3).float().mean().item() < 0.15


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(50):
        ema.update(m)
    assert torch.allclose(ema.shadow["weight"], torch.ones(2, 2), atol=1e-4)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vae_resume_is_exact(tmp_path):
    recipe = DemoRecipe(**{**SMOKE.__dict__, "vae_steps": 6})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, _, _ = train_vae(recipe, tmp_path / "a", 0, torch.device("cpu"), 0, False,
                           Logger(tmp_path / "a.jsonl"), progress=False)
    log = Logger(tmp_path / "b.jsonl")
    train_vae(recipe, tmp_path / "b", 0, torch.device("cpu"), 0, False, log, progress=False, stop_at=3)
    resumed, steps, _ = train_vae(recipe, tmp_path / "b", 0, torch.device("cpu"), 0, True, log, progress=False)
    assert steps == 6
    assert _states_equal(full.state_dict(), resumed.state_dict())


def test_dit_resume_is_exact_across_the_expert_fork(tmp_path):
    from wanx.text.demo_vocab import save_demo_tokenizer
    from wanx.vae import WanVAE

    recipe = DemoRecipe(**{**SMOKE.__dict__, "dit_steps": 6, "clips": 8})
    torch.manual_seed(0)
    cache = build_cache(WanVAE(recipe.vae_config()).eval(), recipe, seed=0)
    tok_dir = tmp_path / "tok"
    save_demo_tokenizer(tok_dir)
    runs = {}
    for name, stops in (("full", [None]), ("resumed", [2, 4, None])):  # fork happens at step 3
        work = tmp_path / name
        work.mkdir()
        for i, stop in enumerate(stops):
            runs[name] = train_dit(recipe, cache, tok_dir, work, 0, torch.device("cpu"), 0, resume=i > 0,
                                   log=Logger(work / "log.jsonl"), progress=False, stop_at=stop)
    a, b = runs["full"], runs["resumed"]
    assert a["step"] == b["step"] == 6
    assert _states_equal(a["t5"].state_dict(), b["t5"].state_dict())
    for ea, eb in zip(a["experts"], b["experts"]):
        assert _states_equal(ea.state_dict(), eb.state_dict())
    # the two experts really are different models after the fork
    assert not _states_equal(a["experts"][0].state_dict(), a["experts"][1].state_dict())


def test_zero_t5_lr_freezes_the_text_encoder_at_its_initialisation(tmp_path):
    from wanx.model import WanDiT
    from wanx.text import Tokenizer, UMT5Encoder
    from wanx.text.demo_vocab import save_demo_tokenizer
    from wanx.vae import WanVAE

    torch.manual_seed(0)
    cache = build_cache(WanVAE(SMOKE.vae_config()).eval(), DemoRecipe(**{**SMOKE.__dict__, "clips": 8}), seed=0)
    tok_dir = save_demo_tokenizer(tmp_path / "tok")
    results = {}
    for lr in (0.0, 5e-4):
        recipe = DemoRecipe(**{**SMOKE.__dict__, "dit_steps": 4, "clips": 8, "t5_lr": lr})
        work = tmp_path / f"lr{lr}"
        work.mkdir()
        results[lr] = train_dit(recipe, cache, tok_dir, work, 0, torch.device("cpu"), 0, resume=False,
                                log=Logger(work / "log.jsonl"), progress=False)
    # train_dit seeds torch with its seed and builds the encoder first: the same draw gives its init
    torch.manual_seed(0)
    vocab = Tokenizer.from_folder(tok_dir, text_len=SMOKE.text_len).vocab_size
    init_t5 = UMT5Encoder(SMOKE.t5_config(vocab)).state_dict()
    init_dit_state = WanDiT(SMOKE.dit_config()).init_weights().state_dict()
    frozen, trained = results[0.0], results[5e-4]
    assert _states_equal(frozen["t5"].state_dict(), init_t5)
    assert not _states_equal(trained["t5"].state_dict(), init_t5)
    assert not _states_equal(frozen["experts"][0].state_dict(), init_dit_state)  # the DiT still learns


def test_smoke_run_exports_a_loadable_folder_and_generates(smoke_run):
    import wanx
    from wanx.loading.layout import find_checkpoint

    root, summary = smoke_run
    out = root / "out"
    assert set(summary["stages"]) == {"vae", "decoder", "stats", "cache", "dit", "export"}
    layout = find_checkpoint(out)
    assert layout.kind == "official" and layout.spec.name == "t2v-A14B"
    # the demo VAE has one stage fewer than the official: 4x4x4, read from wanx.json
    assert layout.spec.vae_stride == (4, 4, 4)
    meta = json.loads((out / "wanx.json").read_text())
    assert meta["task"]["negative_prompt"] == "" and meta["task"]["default_size"] == "16*16"
    assert meta["vae"]["latents_std"] == pytest.approx(summary["stages"]["stats"]["std"])
    pipe = wanx.load_pipeline(out)
    assert len(pipe.experts) == 2
    assert pipe.resolve("a", size="16*16").latent_grid == (2, 4, 4)
    video = pipe.generate("a red circle moving left", seed=1)
    assert video.frames.shape == (SMOKE.frames, 16, 16, 3)
    assert video.metadata["negative_prompt"] == ""
    # the same seed gives the same clip
    again = pipe.generate("a red circle moving left", seed=1)
    assert np.array_equal(video.frames, again.frames)


def test_exported_weights_are_the_trained_ema_weights(smoke_run):
    from wanx.loading.dit import load_dit

    root, _ = smoke_run
    state = torch.load(root / "work" / "dit_ckpt.pt", weights_only=True)
    loaded = load_dit(root / "out" / "high_noise_model")
    shadow = state["emas"]["high"]["shadow"]
    assert all(torch.equal(loaded.state_dict()[k].float(), shadow[k].float()) for k in shadow)


def test_loss_curve_png(smoke_run, tmp_path):
    from PIL import Image

    root, _ = smoke_run
    rows = [json.loads(line) for line in (root / "work" / "log.jsonl").read_text().splitlines()]
    assert {r.get("expert") for r in rows if r["stage"] == "dit"} >= {"high", "low"}
    png = write_loss_curve(root / "work" / "log.jsonl", tmp_path / "loss.png")
    assert Image.open(png).size == (900, 360)


def test_loss_curve_draws_decoder_rows_in_the_vae_panel(tmp_path):
    import numpy as np
    from PIL import Image

    log = tmp_path / "log.jsonl"
    rows = [dict(stage="vae", step=s, loss=1.0 / s) for s in range(1, 50)]
    rows += [dict(stage="decoder", step=s, loss=0.02 + 0.01 / s) for s in range(1, 20)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    img = np.asarray(Image.open(write_loss_curve(log, tmp_path / "loss.png")).convert("RGB")).astype(int)
    decoder_orange = np.all(np.abs(img - (230, 140, 20)) < 30, axis=-1)
    assert decoder_orange[:, :450].any()
    assert not decoder_orange[:, 450:].any()  # nothing drawn in the DiT panel


def test_cli_flags_and_resume_skip_finished_stages(smoke_run, capsys):
    from wanx.train.cli import main

    root, _ = smoke_run
    # everything is finished: --resume reuses the VAE and cache and continues the DiT from its checkpoint
    assert main(["demo", "--smoke", "--resume", "--no-progress", "--work", str(root / "work"),
                 "--out", str(root / "out2")]) == 0
    assert (root / "out2" / "wanx.json").is_file()
    text = capsys.readouterr().out
    assert "dit" in text and "export" in text


def test_decoder_finetuning_keeps_the_encoder_and_resumes_exactly(tmp_path):
    """The decoder stage changes conv2/decoder only (so cached latents stay valid) and resumes exactly."""
    from wanx.train.vae_stage import finetune_decoder
    from wanx.vae import WanVAE

    recipe = DemoRecipe(**{**SMOKE.__dict__, "decoder_steps": 4})
    torch.manual_seed(0)
    base = init_vae(WanVAE(recipe.vae_config()))
    runs = {}
    for name, stops in (("full", [None]), ("resumed", [2, None])):
        work = tmp_path / name
        work.mkdir()
        vae = WanVAE(recipe.vae_config())
        vae.load_state_dict(base.state_dict())
        for i, stop in enumerate(stops):
            vae, steps, _ = finetune_decoder(vae, recipe, work, 0, torch.device("cpu"), resume=i > 0,
                                             log=Logger(work / "log.jsonl"), progress=False, stop_at=stop)
        runs[name] = vae
        assert steps == 4
    full = runs["full"].state_dict()
    assert _states_equal(full, runs["resumed"].state_dict())
    before = base.state_dict()
    for key in before:
        same = torch.equal(before[key], full[key])
        assert same == (not key.startswith(("conv2.", "decoder."))), key
    assert all(p.requires_grad for p in runs["full"].parameters())  # left trainable again


def test_cli_refuses_to_overwrite_a_previous_run_without_asking(smoke_run, tmp_path, capsys):
    """A non-empty --out or a used --work folder needs --resume or --overwrite; checked before training."""
    from wanx.train.cli import main

    root, _ = smoke_run
    out_files = {f: f.stat().st_mtime_ns for f in (root / "out").rglob("*") if f.is_file()}
    assert main(["demo", "--smoke", "--no-progress", "--work", str(tmp_path / "fresh"),
                 "--out", str(root / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in (root / "out").rglob("*") if f.is_file()} == out_files
    assert not (tmp_path / "fresh").exists()  # nothing was started
    assert main(["demo", "--smoke", "--no-progress", "--work", str(root / "work"),
                 "--out", str(tmp_path / "new_out")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "new_out").exists()


def test_cli_refuses_an_out_path_that_is_a_file_before_training(tmp_path, capsys):
    from wanx.train.cli import main

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"not a folder")
    for extra in ([], ["--overwrite"], ["--resume"]):  # no flag turns a file into a folder
        assert main(["demo", "--smoke", "--no-progress", "--work", str(tmp_path / "work"), "--out", str(out),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and "file" in err
    assert out.read_bytes() == b"not a folder"
    assert not (tmp_path / "work").exists()  # nothing was started
    # a file further up the path is caught as well, naming the flag that points there
    assert main(["demo", "--smoke", "--no-progress", "--work", str(out / "work"),
                 "--out", str(tmp_path / "new")]) == 2
    assert "--work" in capsys.readouterr().err


def test_run_demo_checks_its_paths_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--out"):
        run_demo(SMOKE, out, tmp_path / "work", progress=False)
    with pytest.raises(NotADirectoryError, match="--out"):
        run_demo(SMOKE, out / "keep.txt", tmp_path / "work", progress=False, overwrite=True)
    assert not (tmp_path / "work").exists() and (out / "keep.txt").read_text() == "mine"


def _tiny_demo_models():
    from wanx.model import WanDiT
    from wanx.text import UMT5Encoder
    from wanx.text.demo_vocab import build_demo_tokenizer
    from wanx.vae import WanVAE

    torch.manual_seed(0)
    t5 = UMT5Encoder(SMOKE.t5_config(build_demo_tokenizer().get_vocab_size()))
    return WanVAE(SMOKE.vae_config()), t5, (WanDiT(SMOKE.dit_config()), WanDiT(SMOKE.dit_config()))


def test_export_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    from wanx.loading import dit as dit_loading
    from wanx.train.export import export_folder

    vae, t5, experts = _tiny_demo_models()
    out = tmp_path / "out"

    def fail_midway(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(dit_loading, "save_dit", fail_midway)
        with pytest.raises(RuntimeError, match="disk full"):
            export_folder(out, SMOKE, vae, t5, experts, {"seed": 0})
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temporary left behind
    export_folder(out, SMOKE, vae, t5, experts, {"seed": 0})
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"wanx.json", "training_summary.json", "Wan2.1_VAE.pth", "high_noise_model/config.json",
            "low_noise_model/diffusion_pytorch_model.safetensors"} <= names
    assert json.loads((out / "training_summary.json").read_text()) == {"seed": 0}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="overwrite"):
        export_folder(out, SMOKE, vae, t5, experts, {"seed": 1})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    export_folder(out, SMOKE, vae, t5, experts, {"seed": 1}, overwrite=True)
    assert json.loads((out / "training_summary.json").read_text()) == {"seed": 1}


def test_loss_curve_never_replaces_a_file_unasked(smoke_run, tmp_path):
    root, _ = smoke_run
    png = tmp_path / "loss.png"
    png.write_bytes(b"an older picture")
    with pytest.raises(FileExistsError):
        write_loss_curve(root / "work" / "log.jsonl", png)
    assert png.read_bytes() == b"an older picture"
    write_loss_curve(root / "work" / "log.jsonl", png, overwrite=True)
    assert png.read_bytes().startswith(b"\x89PNG")
