"""DecoderNormAdam: Adam plus the decoder-norm step, fused or as three ops, as SAEModule uses it.

The Triton pass it runs on CUDA is checked against these ops in test_kernels.py (the training
step tests take DecoderNormAdam on every backend); here the torch paths: `fuse=True` runs
`decoder_adam_step_`'s blocked torch ops, `fuse=False` the kernels around torch's Adam.
"""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from saetrain import DecoderNormAdam, SAEModule
from saetrain.sae import SAE, SAEConfig, _full

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8)


def make_sae(seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=12, num_latents=40, k=3, k_aux=4))
    sae.init_from_data(torch.randn(64, 12) + 0.3)
    return sae


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 12, generator=gen) + 0.3 for _ in range(n)]


def loss_of(sae, x):
    dead = torch.arange(40) < 10
    out = sae(x, dead)
    return out.fvu + sae.cfg.auxk_coef * out.auxk_loss


def run(sae, opt, xs, project_first=False):
    for x in xs:
        loss_of(sae, x).backward()
        if project_first:
            sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
    return sae


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def close_states(a, b):
    for name, value in b.state_dict().items():
        close(a.state_dict()[name], value)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_it_steps_like_adam_between_the_projection_and_the_renormalisation(fuse):
    sae = make_sae()
    ours = copy.deepcopy(sae)
    run(
        ours,
        DecoderNormAdam(ours.parameters(), decoders=[ours.W_dec], fuse=fuse, **HYPER),
        batches(3),
    )
    adam = torch.optim.Adam(sae.parameters(), **HYPER)
    for x in batches(3):
        loss_of(sae, x).backward()
        sae.remove_parallel_grad()
        adam.step()
        adam.zero_grad()
        sae.normalize_decoder()
    close_states(ours, sae)
    close(ours.W_dec.detach().norm(dim=1), torch.ones(40))
    assert not torch.equal(ours.W_dec, make_sae().W_dec)  # the steps moved the decoder


def test_state_dicts_move_between_fused_separate_and_torch_adam():
    # Two steps fused, then a third fused, separate, or in torch's Adam with the SAE's own
    # decoder-norm calls: the same state (step counts, moments) continues in each.
    sae = make_sae()
    opt = DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], fuse=True, **HYPER)
    run(sae, opt, batches(2))
    assert opt.state[sae.W_dec]["step"].item() == 2
    state = copy.deepcopy(opt.state_dict())
    results = []
    for kind in ("fused", "separate", "torch"):
        s = copy.deepcopy(sae)
        if kind == "torch":
            o = torch.optim.Adam(s.parameters(), **HYPER)
        else:
            o = DecoderNormAdam(s.parameters(), decoders=[s.W_dec], fuse=kind == "fused", **HYPER)
        o.load_state_dict(copy.deepcopy(state))  # loading keeps its step tensors
        o.param_groups[0]["lr"] = 0.02  # in the loaded groups, as a scheduler sets it
        run(s, o, batches(1, seed=2), project_first=kind == "torch")
        if kind == "torch":
            s.normalize_decoder()
        assert o.state[s.W_dec]["step"].item() == 3
        results.append(s)
    for other in results[1:]:
        close_states(other, results[0])


def test_project_decoders_false_leaves_the_projection_to_the_caller():
    sae = make_sae()
    default, caller, neither = (copy.deepcopy(sae) for _ in range(3))
    for s, project_decoders, project_first in (
        (default, True, False),
        (caller, False, True),
        (neither, False, False),
    ):
        opt = DecoderNormAdam(
            s.parameters(), decoders=[s.W_dec], project_decoders=project_decoders, fuse=True,
            **HYPER,
        )  # fmt: skip
        run(s, opt, batches(2), project_first=project_first)
    close_states(caller, default)
    assert (neither.W_dec - default.W_dec).abs().max() > 1e-4  # the projection matters
    close(neither.W_dec.detach().norm(dim=1), torch.ones(40))  # renormalised either way


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_a_step_at_lr_zero_leaves_the_parameters_bit_for_bit(fuse):
    # What torch.distributed.checkpoint does to build an empty optimizer's state before it
    # loads a checkpoint's (under fsdp2): zero gradients, lr 0, step(). Renormalising the
    # decoder's unit rows there would change their last bits, and resumes would not be exact.
    sae = make_sae()
    run(sae, DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], **HYPER), batches(1))
    before = copy.deepcopy(sae.state_dict())
    opt = DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], fuse=fuse, **HYPER)
    loss_of(sae, batches(1, seed=3)[0]).backward()
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    assert all(torch.equal(sae.state_dict()[name], value) for name, value in before.items())
    assert opt.state[sae.W_dec]["step"].item() == 1  # Adam's state was still built


def test_bad_decoders_are_refused_with_a_clear_message():
    sae = make_sae()
    with pytest.raises(ValueError, match="a decoder is not among the optimized parameters"):
        DecoderNormAdam([sae.W_enc], decoders=[sae.W_dec])
    with pytest.raises(ValueError, match="decoders are \\(num_latents, d_in\\) matrices"):
        DecoderNormAdam(sae.parameters(), decoders=[sae.b_dec])
    with pytest.raises(ValueError, match="neither amsgrad nor maximize"):
        DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], amsgrad=True)


class ClipChecked(SAEModule):
    """Records, where Lightning clips, whether the decoder gradients are already projected."""

    projected_at_clip: list[bool]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, **kwargs):
        W, g = self.sae.W_dec.detach(), self.sae.W_dec.grad
        self.projected_at_clip.append(bool((W * g).sum(1).abs().max() < 1e-6))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, **kwargs)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sae_module_projects_before_lightning_clips_gradients(clip, tmp_path):
    torch.manual_seed(0)
    module = ClipChecked(d_in=12, num_latents=40, k=3, k_aux=4, warmup_steps=0)
    module.projected_at_clip = []
    trainer = L.Trainer(
        max_steps=3, gradient_clip_val=clip, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(torch.randn(48, 12) + 0.3, batch_size=16))
    opt = trainer.optimizers[0]
    assert isinstance(opt, DecoderNormAdam) and opt.project_decoders == (clip is None)
    # Projected before clipping when there is clipping; else inside the optimizer's step.
    assert module.projected_at_clip == [clip is not None] * 3
    close(module.sae.W_dec.detach().norm(dim=1), torch.ones(40))


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
def test_fsdp2_row_shards_step_as_the_whole_tensors_do(fuse, one_rank_group):
    # Under fully_shard the parameters, their gradients and Adam's moments are DTensors; the
    # decoder's step runs on this rank's rows (here all of them, on a one-rank mesh).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    sae = make_sae()
    sharded = copy.deepcopy(sae)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    assert isinstance(sharded.W_dec, DTensor)
    opt = DecoderNormAdam(sharded.parameters(), decoders=[sharded.W_dec], fuse=fuse, **HYPER)
    run(sharded, opt, batches(3))
    assert isinstance(opt.state[sharded.W_dec]["exp_avg"], DTensor)
    run(
        sae, DecoderNormAdam(sae.parameters(), decoders=[sae.W_dec], fuse=fuse, **HYPER), batches(3)
    )
    for name, value in sae.state_dict().items():
        close(_full(sharded.state_dict()[name]), value)
