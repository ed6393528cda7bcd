"""Train the testbed from scratch on one GPU, stopping by wall clock; resumable.

    python -m testbed.train --out testbed/weights --minutes 9.5 --seed 0        # one command
    python -m testbed.train --minutes 7.5 --total-minutes 15 --seed 0 --checkpoint ckpt   # first of two
    python -m testbed.train --minutes 7.5 --resume ckpt --out testbed/weights             # second of two
    python -m testbed.train --out /tmp/w --steps 3 --device cpu                  # smoke run

Stage 1 (teacher): rectified flow on scenes rendered on the GPU from the training
split, text encoder trained jointly, 10% of captions dropped (so an unconditional
prediction exists); the guidance input gets random values it cannot use.
Stage 2 (last --distill-frac of the training time): guidance distillation as
FLUX.1-dev: the student (initialised from the EMA teacher) with guidance g learns
teacher_uncond + cfg(g) * (teacher_cond - teacher_uncond), cfg(g) = 1 + 0.4 (g - 1),
so sampling needs one model call per step and takes `guidance` like FLUX.1-dev.

Budget: --minutes is this command's wall clock from interpreter start; training
stops early enough to save the files (and, in the last command, to reload them and
score the held-out prompts).  --total-minutes spreads one schedule over several
commands (one device command may run 10 minutes at most): every command but the
last trains the teacher until its own deadline and writes a compact training
checkpoint (testbed.resume) to --checkpoint; `--resume DIR` continues it (the
training arguments come from the checkpoint), and the command whose budget reaches
the total distils, saves the weights and evaluates.
"""

from __future__ import annotations

import time

T0 = time.time()  # before importing torch: as a script, the budget counts from process start

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from converter.flux_model import (  # noqa: E402
    Flux,
    FluxConfig,
    get_lin_function,
    image_to_latent,
    make_img_ids,
    make_txt_ids,
    pack,
    time_shift,
)

from . import resume as ckpt  # noqa: E402
from .checkpoint import FLUX_FILE, MAX_FILE_BYTES, TEXT_FILE, load_testbed, save_flux, save_text_encoder  # noqa: E402
from .evaluate import evaluate, format_table, save_grid  # noqa: E402
from .prompts import allowed_colors, train_specs  # noqa: E402
from .sampling import DEFAULT_GUIDANCE, LATENT_SIZE, SEQ_LEN  # noqa: E402
from .scenes import CATEGORIES, SpecTable, render, sample_scenes  # noqa: E402
from .text import TextEncoder  # noqa: E402

# Share of training batches per caption category: the relational ones (position,
# colour attribution) and counting get more; "single" captions are evaluation-only.
CATEGORY_WEIGHTS = {"two": 0.14, "counting": 0.22, "colors": 0.10, "position": 0.27, "color_attr": 0.27}
GUIDANCE_RANGE = (1.0, 5.0)  # distilled guidance values (FLUX.1-dev is used around 1.5 to 5)
# Classifier-free guidance scale the student learns for guidance value g: 1 + (g - 1) * this.
# FLUX.1-dev's distilled guidance is not a CFG scale either; with 0.4 its default 3.5
# means CFG 2, where the first model's held-out score peaked (63%; at CFG 3.5 and 5
# counting fell to 41% and 30%: over-counted 58 and 68 of 100 prompts).
CFG_PER_GUIDANCE = 0.4
MU = get_lin_function()(SEQ_LEN)  # FLUX's shift for 256 image tokens, also used for training timesteps
CHECKPOINT_RESERVE_S = 10.0  # end of a non-final command: gather and write the training checkpoint
# Arguments a resumed run takes from its checkpoint (they define the one schedule).
RESUMED_ARGS = ("seed", "batch", "lr", "distill_lr", "distill_frac", "cond_drop", "warmup", "ema", "steps",
                "total_minutes")


_start = T0  # reset by main(): when called from Python, the budget counts from the call


def log(msg: str) -> None:
    print(f"[{time.time() - _start:7.1f}s] {msg}", flush=True)


def cfg_scale(g: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance scale distilled for guidance value g."""
    return 1.0 + (g - 1.0) * CFG_PER_GUIDANCE


def init_weights(model: Flux) -> None:
    """DiT-style init: xavier linears, small embedders, adaLN-Zero (every
    modulation and the output layer start at zero, so each block starts as the
    identity), and a zero guidance embedder (stage 1 must not depend on it)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for emb in (model.time_in, model.vector_in, model.guidance_in):
        if isinstance(emb, nn.Module) and hasattr(emb, "in_layer"):
            nn.init.normal_(emb.in_layer.weight, std=0.02)
            nn.init.normal_(emb.out_layer.weight, std=0.02)
    zero = [b.img_mod.lin for b in model.double_blocks] + [b.txt_mod.lin for b in model.double_blocks]
    zero += [b.modulation.lin for b in model.single_blocks]
    zero += [model.final_layer.linear, model.final_layer.adaLN_modulation[1]]
    if model.params.guidance_embed:
        zero.append(model.guidance_in.out_layer)
    for lin in zero:
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


class Data:
    """Training batches rendered on the device: (latent x0 [B, 12, 32, 32], tokens [B, T])."""

    def __init__(self, encoder: TextEncoder, device: torch.device, seed: int) -> None:
        specs = train_specs()
        self.table = SpecTable(specs, device)
        self.tokens = encoder.tokenizer.encode([s.caption for s in specs]).to(device)
        counts = torch.bincount(self.table.category, minlength=len(CATEGORIES)).float()
        weights = torch.tensor([CATEGORY_WEIGHTS.get(c, 0.0) for c in CATEGORIES], device=device)
        self.probs = (weights / counts.clamp(min=1))[self.table.category]
        self.allowed = allowed_colors().to(device)
        self.gen = torch.Generator(device).manual_seed(seed)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.multinomial(self.probs, b, replacement=True, generator=self.gen)
        scene = sample_scenes(self.table, idx, self.gen, self.allowed)
        return image_to_latent(render(scene)), self.tokens[idx]

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.gen.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.gen.device)

    def timesteps(self, b: int) -> torch.Tensor:
        """Logit-normal t, shifted like the sampling schedule (t = 1 is noise)."""
        return time_shift(MU, 1.0, torch.sigmoid(self.randn(b)))

    def guidance(self, b: int) -> torch.Tensor:
        """Guidance values uniform in GUIDANCE_RANGE."""
        lo, hi = GUIDANCE_RANGE
        return lo + (hi - lo) * self.rand(b)


def flow_inputs(data: Data, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, x_t packed, velocity target packed) for rectified flow."""
    b = x0.shape[0]
    t = data.timesteps(b)
    noise = data.randn(*x0.shape)
    tt = t.view(b, 1, 1, 1)
    return t, pack((1 - tt) * x0 + tt * noise), pack(noise - x0)


def call(model: Callable[..., torch.Tensor], x: torch.Tensor, ctx: torch.Tensor, vec: torch.Tensor,
         t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b, dev = x.shape[0], x.device
    return model(img=x, img_ids=make_img_ids(b, LATENT_SIZE, LATENT_SIZE, dev), txt=ctx,
                 txt_ids=make_txt_ids(b, ctx.shape[1], dev), timesteps=t, y=vec, guidance=g)


class EMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))  # warm-up: early weights fade fast
        torch._foreach_lerp_(list(self.module.parameters()), list(module.parameters()), 1 - d)


def lr_at(step: int, frac: float, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine from base to floor*base over the stage (frac in [0, 1])."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="testbed/weights", help="where the last command writes the weights")
    ap.add_argument("--minutes", type=float, default=8.0, help="this command's wall-clock budget from process start")
    ap.add_argument("--total-minutes", type=float, default=None,
                    help="budget of all commands together (default --minutes: one command); fixed by the first")
    ap.add_argument("--checkpoint", default=None, help="directory for the training checkpoint of a non-final command")
    ap.add_argument("--resume", default=None, help="continue from this training checkpoint")
    ap.add_argument("--steps", type=int, default=None, help="fixed total step count (smoke runs); time still caps it")
    ap.add_argument("--run-steps", type=int, default=None,
                    help="with --steps: teacher steps in this command (then checkpoint), for tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 4 on CPU")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-frac", type=float, default=0.15, help="share of the training time for distillation")
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=250)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out prompts scored at the end (default 600 / 6)")
    ap.add_argument("--eval-steps", type=int, default=None, help="default 20 on CUDA, 2 on CPU")
    ap.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 2.0, 3.5, 5.0])
    ap.add_argument("--log-every", type=int, default=None, help="default 500 on CUDA, 100 on CPU")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (256 if cuda else 4)
    args.compile = cuda if args.compile is None else args.compile
    args.eval_n = (600 if cuda else 6) if args.eval_n is None else args.eval_n
    args.eval_steps = args.eval_steps or (20 if cuda else 2)
    args.log_every = args.log_every or (500 if cuda else 100)
    args.total_minutes = args.minutes if args.total_minutes is None else args.total_minutes
    return args


def run_stage(
    name: str, n_steps: int | None, deadline: float, step_fn: Callable[[int, float], torch.Tensor],
    history: list[dict[str, Any]], batch: int, log_every: int, frac_fn: Callable[[int], float],
    first_step: int = 0, run: int = 0,
) -> int:
    """Call step_fn(global step, frac) until n_steps (in this call) or the
    deadline; frac_fn(local step) is the share of the stage done."""
    step, acc, last = 0, 0.0, time.time()
    while (n_steps is None or step < n_steps) and time.time() < deadline:
        acc = step_fn(first_step + step, frac_fn(step)).detach() + acc
        step += 1
        if step % log_every == 0 or step == n_steps:
            loss = float(acc) / (step % log_every or log_every)  # the one sync per log interval
            now = time.time()
            rate = batch * (step % log_every or log_every) / (now - last)
            history.append({"stage": name, "run": run, "step": first_step + step, "loss": round(loss, 5),
                            "samples_per_s": round(rate, 1), "elapsed_s": round(now - _start, 1)})
            log(f"{name} step {first_step + step:6d}  loss {loss:.4f}  {rate:8.0f} samples/s")
            acc, last = 0.0, now
    return step


def final_reserve(args: argparse.Namespace) -> float:
    """Seconds kept at the end of the last command: save, reload, score (about 2 s
    per guidance value for 600 prompts on an H100)."""
    return 12.0 + 3.0 * len(args.eval_guidance) if args.eval_n else 8.0


def main(argv: list[str] | None = None, start: float | None = None) -> dict[str, Any]:
    """Train, save, evaluate; returns the summary written to train_log.json (in a
    non-final command: the checkpoint's state).  start: time the budget counts
    from (default: now)."""
    global _start
    _start = time.time() if start is None else start
    args = parse_args(argv)
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    if args.resume:
        tensors, state = ckpt.load_training_state(args.resume)
        for k in RESUMED_ARGS:
            setattr(args, k, state["args"][k])
        log(f"resuming {args.resume}: run {len(state['runs'])}, {state['teacher_steps']} teacher steps, "
            f"{state['train_s']:.0f} s trained, {state['wall_s']:.0f} s of {60 * args.total_minutes:.0f} s used")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = FluxConfig()
    model = Flux(config).to(device)
    init_weights(model)
    encoder = TextEncoder().to(device)
    n_flux = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in encoder.parameters())
    # bf16 files: 2 bytes per parameter plus a small header must fit the size limit
    assert 2 * n_flux + 64_000 <= MAX_FILE_BYTES, f"transformer too large: {n_flux} parameters"
    assert 2 * n_text + 64_000 <= MAX_FILE_BYTES, f"text encoder too large: {n_text} parameters"
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    log(f"transformer {n_flux:,} parameters, text encoder {n_text:,}; {device_name}, batch {args.batch}")

    data = Data(encoder, device, args.seed)
    params = list(model.parameters()) + list(encoder.parameters())
    param_names = [f"model/{n}" for n, _ in model.named_parameters()]
    param_names += [f"text/{n}" for n, _ in encoder.named_parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0, fused=cuda)
    steps_before = state.get("teacher_steps", 0)
    if args.resume:
        ckpt.load_module("model", model, tensors)
        ckpt.load_module("text", encoder, tensors)
        ckpt.load_optimizer(opt, param_names, tensors, steps_before)
        ckpt.restore_generator(data.gen, tensors["rng/data"])
        del tensors
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    net: Callable[..., torch.Tensor] = torch.compile(model) if args.compile else model

    # ---- plan: is this the last command, and how long is the whole schedule?
    run = len(state.get("runs", []))
    prev_wall, train_before = state.get("wall_s", 0.0), state.get("train_s", 0.0)
    history: list[dict[str, Any]] = list(state.get("history", []))
    n1 = n2 = None
    if args.steps is not None:
        n2 = round(args.steps * args.distill_frac)
        n1 = args.steps - n2
        final = args.run_steps is None or steps_before + args.run_steps >= n1
    else:
        final = prev_wall + 60 * args.minutes >= 60 * args.total_minutes - 30
    if not final and not args.checkpoint:
        raise SystemExit("this command does not reach the end of the schedule (--total-minutes / --run-steps): "
                         "give --checkpoint DIR for its training checkpoint")
    end = _start + 60 * args.minutes - (final_reserve(args) if final else CHECKPOINT_RESERVE_S)
    loop_start = time.time()
    planned = train_before + (end - loop_start)  # training seconds of the whole schedule
    if not final:  # later commands: the same startup, the last one's reserve
        later = 60 * args.total_minutes - prev_wall - 60 * args.minutes
        n_later = max(1, math.ceil(later / (60 * args.minutes) - 1e-9))
        planned += later - n_later * (loop_start - _start) - (n_later - 1) * CHECKPOINT_RESERVE_S - final_reserve(args)
    teacher_total = (1 - args.distill_frac) * planned
    stage1_end = min(end, loop_start + teacher_total - train_before) if final else end
    if n1 is not None:
        run_n1 = max(n1 - steps_before, 0) if final else min(args.run_steps, n1 - steps_before)
    else:
        run_n1 = None

    # ---- stage 1: teacher
    ema_model, ema_text = EMA(model, args.ema), EMA(encoder, args.ema)

    def teacher_loss(net: Callable[..., torch.Tensor]) -> torch.Tensor:
        x0, tokens = data.batch(args.batch)
        tokens = torch.where(data.rand(args.batch, 1) < args.cond_drop, 0, tokens)
        t, xt, target = flow_inputs(data, x0)
        g = data.guidance(args.batch)
        with amp:
            ctx, vec = encoder(tokens)
            pred = call(net, xt, ctx, vec, t, g)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def teacher_step(step: int, frac: float) -> torch.Tensor:
        nonlocal net
        for group in opt.param_groups:
            group["lr"] = lr_at(step, frac, args.lr, args.warmup)
        try:
            loss = teacher_loss(net)
        except Exception as e:  # a compile failure must not cost the run: fall back to eager
            if net is model:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {e}); continuing eager")
            net = model
            loss = teacher_loss(net)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_model.update(model)
        ema_text.update(encoder)
        return loss

    def teacher_frac(local_step: int) -> float:
        if n1:
            return (steps_before + local_step) / n1
        return (train_before + time.time() - loop_start) / max(teacher_total, 1e-6)

    model.train()
    steps1 = run_stage("teacher", run_n1, stage1_end, teacher_step, history, args.batch, args.log_every,
                       teacher_frac, steps_before, run)
    train_s = train_before + time.time() - loop_start
    runs = [*state.get("runs", []), {"device": device_name, "teacher_steps": steps1}]

    if not final:  # ---- save the training state for the next command and stop
        t_save = time.time()
        tensors = ckpt.module_tensors("model", model) | ckpt.module_tensors("text", encoder)
        tensors |= ckpt.optimizer_tensors(opt, param_names)
        tensors["rng/data"] = ckpt.generator_tensor(data.gen)
        runs[-1]["wall_s"] = round(time.time() - _start + 1.0, 1)  # + about the write below
        new_state = {
            "args": {k: getattr(args, k) for k in RESUMED_ARGS}, "teacher_steps": steps_before + steps1,
            "train_s": round(train_s, 2), "wall_s": round(prev_wall + runs[-1]["wall_s"], 1), "runs": runs,
            "history": history, "flux_config": config.to_dict(), "parameters": {"flux": n_flux, "text_encoder": n_text},
        }
        paths = ckpt.save_training_state(args.checkpoint, tensors, new_state)
        size = sum(os.path.getsize(p) for p in paths)
        log(f"checkpoint after {steps_before + steps1} teacher steps: {len(paths)} files, {size:,} bytes in "
            f"{args.checkpoint} ({time.time() - t_save:.1f} s); continue with --resume {args.checkpoint}")
        return new_state

    final_model, final_text = ema_model.module, ema_text.module
    steps2 = 0

    # ---- stage 2: guidance distillation into the same (compiled) module
    if args.distill_frac > 0 and (n2 is None or n2 > 0):
        teacher, text = ema_model.module, ema_text.module
        model.load_state_dict(teacher.state_dict())
        student_params = list(model.parameters())
        opt = torch.optim.AdamW(student_params, lr=args.distill_lr, betas=(0.9, 0.98), weight_decay=0.0, fused=cuda)
        ema_student = EMA(model, 0.998)  # shorter horizon: this stage is short
        with torch.no_grad(), amp:
            ctx_u, vec_u = text(torch.zeros(1, encoder.config.max_len, dtype=torch.long, device=device))

        def student_step(step: int, frac: float) -> torch.Tensor:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, frac, args.distill_lr, 50, floor=0.0)
            x0, tokens = data.batch(args.batch)
            t, xt, _ = flow_inputs(data, x0)
            g = data.guidance(args.batch)
            b = args.batch
            with torch.no_grad(), amp:
                ctx_c, vec_c = text(tokens)
                ctx = torch.cat([ctx_c, ctx_u.expand(b, -1, -1)])
                vec = torch.cat([vec_c, vec_u.expand(b, -1)])
                v = call(teacher, torch.cat([xt, xt]), ctx, vec, torch.cat([t, t]), torch.ones(2 * b, device=device))
                v_c, v_u = v.float().chunk(2)
                target = v_u + cfg_scale(g).view(b, 1, 1) * (v_c - v_u)
            # The compiled graph from stage 1 saw text inputs that require grad; matching
            # that avoids a second compilation (a minute) inside this short stage.
            ctx_c.requires_grad_(True)
            vec_c.requires_grad_(True)
            with amp:
                pred = call(net, xt, ctx_c, vec_c, t, g)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student_params, 1.0)
            opt.step()
            ema_student.update(model)
            return loss

        start2 = time.time()

        def student_frac(local_step: int) -> float:
            return local_step / n2 if n2 else (time.time() - start2) / max(end - start2, 1e-6)

        steps2 = run_stage("distill", n2, end, student_step, history, args.batch, args.log_every, student_frac,
                           0, run)
        if steps2:
            final_model = ema_student.module
    runs[-1]["distill_steps"] = steps2

    # ---- save, reload what was saved, score the held-out prompts
    os.makedirs(args.out, exist_ok=True)
    flux_path, text_path = os.path.join(args.out, FLUX_FILE), os.path.join(args.out, TEXT_FILE)
    teacher_steps = steps_before + steps1
    train_info = {"seed": args.seed, "teacher_steps": teacher_steps, "distill_steps": steps2, "batch": args.batch,
                  "guidance_distilled": steps2 > 0, "guidance_range": list(GUIDANCE_RANGE),
                  "cfg_per_guidance": CFG_PER_GUIDANCE, "commands": len(runs)}
    save_flux(final_model, flux_path, {"training": train_info})
    save_text_encoder(final_text, text_path)
    sizes = {FLUX_FILE: os.path.getsize(flux_path), TEXT_FILE: os.path.getsize(text_path)}
    log(f"saved {sizes} after {teacher_steps} teacher + {steps2} distillation steps")

    evals = []
    if args.eval_n:
        model_bf16, text_bf16 = load_testbed(args.out, device)
        grid_g = DEFAULT_GUIDANCE if DEFAULT_GUIDANCE in args.eval_guidance else args.eval_guidance[0]
        for g in args.eval_guidance:
            res = evaluate(model_bf16, text_bf16, args.eval_n, device, args.eval_steps, g, seed=0,
                           return_images=g == grid_g)
            log(f"held-out eval, guidance {g}:\n{format_table(res)}")
            if "images" in res:  # first 48 evaluation prompts, in eval_items() order, 12 per row
                save_grid(res["images"][:48], os.path.join(args.out, "samples.png"))
            evals.append({k: v for k, v in res.items() if k not in ("captions", "passed", "reasons", "images")})

    runs[-1]["wall_s"] = round(time.time() - _start, 1)
    summary = {
        "args": vars(args), "flux_config": config.to_dict(), "parameters": {"flux": n_flux, "text_encoder": n_text},
        "file_bytes": sizes, "training": train_info, "runs": runs, "history": history, "eval": evals,
        "best_guidance": max(evals, key=lambda e: e["overall"])["guidance"] if evals else None,
        "train_s": round(time.time() - loop_start + train_before, 1),
        "wall_s": round(prev_wall + runs[-1]["wall_s"], 1),
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"done in {runs[-1]['wall_s']} s (all commands: {summary['wall_s']} s)")
    return summary


if __name__ == "__main__":
    main(start=T0)
