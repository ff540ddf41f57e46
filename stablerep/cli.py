"""The `stablerep` command line: parse -> config -> one library call per command.

Every command takes ``--config RECIPE.yaml`` and any number of ``--set key.path=value``
overrides; its own flags are shortcuts for the most used fields and win over both. Flags with a
fixed set of values offer exactly the values of their config field (:func:`config.choices`).

Every failure ends in one line on stderr: a user error (a bad value, file or path, or a
command line click cannot parse) prints ``error: ...`` and exits with status 2; an unexpected
exception is a bug and keeps its traceback, followed by ``error: internal error: ...``, exit
status 1; a run stopped from outside (a lost peer: :class:`~stablerep.errors.RetryableError`)
prints its line and exits with a status of 128 or more, which job failure policies retry. The
table of statuses is in :mod:`stablerep.errors`.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, NoReturn

import click

from stablerep import __version__, stages
from stablerep.config import (
    CAPTION_FORMATS,
    CaptionsConfig,
    Config,
    GenerateConfig,
    TrainConfig,
    choices,
    dump_yaml,
    load_config,
)
from stablerep.devices import device_help
from stablerep.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    RetryableError,
    StablerepError,
)


def _fail(message: str, status: int) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``status``."""
    sys.stdout.flush()
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(status)


def _usage_message(e: click.ClickException) -> str:
    """Click's message for a command line it cannot parse, as one line with a help hint."""
    text = " ".join(e.format_message().split())
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and first[1:].islower():  # "Invalid value ..." -> "invalid ..."
        text = text[0].lower() + text[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def _internal_error(e: Exception) -> NoReturn:
    """A bug: the full traceback, then a one-line summary; exit status 1."""
    sys.stdout.flush()
    traceback.print_exc()
    lines = str(e).strip().splitlines()
    detail = f": {lines[0][:300]}" if lines else ""
    _fail(f"internal error: {type(e).__name__}{detail} (this is a bug; please report it "
          "with the traceback above)", EXIT_BUG)


class _Group(click.Group):
    """A click group whose every failure ends in one ``error:`` line on stderr.

    Click's usage errors (an unknown option, a bad choice, a missing value), the project's
    user errors (:class:`StablerepError`) and a local path that is a regular file where a
    folder is expected (or the reverse) exit with status 2; ``--help`` and ``--version``
    work as usual; anything else is a bug (see :func:`_internal_error`).
    """

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:  # the caller handles exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `stablerep`: the help text
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            _fail(_usage_message(e), EXIT_USER_ERROR)
        except click.Abort:  # Ctrl-C or end of input
            _fail("interrupted", EXIT_INTERRUPTED)
        except StablerepError as e:
            _fail(str(e), EXIT_USER_ERROR)
        except RetryableError as e:  # a lost peer: the job's restart resumes the run
            _fail(str(e), e.exit_code)
        except Exception as e:  # noqa: BLE001 - sorted into user path errors and bugs
            from stablerep.local_paths import describe_path_error

            problem = describe_path_error(e)
            if problem is not None:
                named = str(e.filename)  # type: ignore[attr-defined] - an OSError here
                _fail(problem if named in problem else f"{named}: {problem}", EXIT_USER_ERROR)
            _internal_error(e)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "aiobotocore", "gcsfs", "fsspec", "s3fs", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def command_config(recipe: str | None, overrides: tuple[str, ...], section: str,
                   flags: dict[str, Any], *, data_root: str | None, print_config: bool
                   ) -> Config | None:
    """Recipe < ``--set`` overrides < explicit flags -> Config; None after --print-config."""
    cfg = load_config(recipe, overrides, require=(section,), flags={section: flags},
                      data_root=data_root)
    if print_config:
        click.echo(dump_yaml(cfg), nl=False)
        return None
    return cfg


def _common(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                      help="Override one config field (repeatable), e.g. "
                           "--set captions.num_shards=8.")(fn)
    fn = click.option("--config", "recipe", metavar="URI",
                      help="Built-in recipe name (demo, cc12m ...) or YAML recipe (local path or "
                           "gs://, s3:// URI).")(fn)
    fn = click.option("--data-root", metavar="URI",
                      help="Folder under which stages write by default.")(fn)
    return fn


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stablerep")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """StableRep: learn visual representations from synthetic images.

    Stages: captions -> generate -> train -> eval. Each reads a YAML recipe (--config),
    takes --set overrides, and writes under --data-root (a folder, gs:// or s3://).
    """
    _setup_logging(log_level)


@main.command()
@_common
@click.option("--source", type=click.Choice(choices(CaptionsConfig, "source")),
              help="Caption source [config default: synthetic].")
@click.option("--input", "inputs", multiple=True, metavar="URI",
              help="Caption file, folder or glob (repeatable); implies --source files.")
@click.option("--format", "fmt", help=f"File layout: {', '.join(CAPTION_FORMATS)}.")
@click.option("--column", help="Column / field holding the caption.")
@click.option("--num-captions", type=int, help="How many captions to sample.")
@click.option("--num-shards", type=int, help="Number of Parquet parts to write.")
@click.option("--seed", type=int, help="Sampling seed.")
@click.option("--out", metavar="URI", help="Output folder [default: <data-root>/captions].")
@click.option("--allow-fewer", is_flag=True, default=None,
              help="Accept fewer captions than --num-captions when the source has fewer.")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace captions made with another config under --out.")
@click.option("--work-dir", metavar="PATH", help="Local scratch folder for spill files.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def captions(recipe, overrides, data_root, source, inputs, fmt, column, num_captions,
             num_shards, seed, out, allow_fewer, overwrite, work_dir, print_config) -> None:
    """Sample captions from caption files or synthesise them; write Parquet parts + manifest.

    \b
    Examples:
      stablerep captions --num-captions 10000 --num-shards 8 --data-root ./data
      stablerep captions --input 'gs://bucket/cc3m/*.tsv' --num-captions 1000000 \\
          --num-shards 256 --out gs://bucket/run1/captions
    """
    from stablerep.captions import format_summary
    from stablerep.contracts import load_captions_manifest

    flags = {"source": "files" if inputs and source is None else source, "inputs": inputs,
             "format": fmt, "column": column, "num_captions": num_captions,
             "num_shards": num_shards, "seed": seed, "out": out, "allow_fewer": allow_fewer,
             "overwrite": overwrite, "work_dir": work_dir}
    cfg = command_config(recipe, overrides, "captions", flags, data_root=data_root,
                       print_config=print_config)
    if cfg is None:
        return
    result = stages.run_captions(cfg)
    click.echo(format_summary(load_captions_manifest(result.uri)))
    click.echo(f"captions: {result.count:,} captions written to {result.uri}")


@main.command()
@_common
@click.option("--captions", "captions_uri", metavar="URI",
              help="Captions folder [default: <data-root>/captions].")
@click.option("--out", metavar="URI", help="Images folder [default: <data-root>/images].")
@click.option("--backend", type=click.Choice(choices(GenerateConfig, "backend")),
              help="diffusers (any text-to-image pipeline), tiny (offline, random weights) or "
                   "procedural (rendered digits and shapes).")
@click.option("--model", metavar="ID|PATH|URI", help="Hub id, local folder or storage URI.")
@click.option("--images-per-caption", "-m", type=int, help="Images drawn per caption.")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance scale.")
@click.option("--steps", "num_inference_steps", type=int, help="Denoising steps.")
@click.option("--scheduler", type=click.Choice(choices(GenerateConfig, "scheduler")))
@click.option("--size", type=int, help="Generation height and width (multiple of 8).")
@click.option("--stored-size", type=int, help="Stored shorter side (0 = as generated).")
@click.option("--image-format", type=click.Choice(choices(GenerateConfig, "image_format")))
@click.option("--seed", type=int, help="Global seed.")
@click.option("--batch-size", type=int, help="Images per denoising call.")
@click.option("--shard", type=int, help="Process only this captions shard.")
@click.option("--all-shards", is_flag=True, default=None, help="Process every shard.")
@click.option("--shard-from-env", is_flag=True, default=None,
              help="Take the shard from JOB_COMPLETION_INDEX (Kubernetes Indexed Job).")
@click.option("--device", help=f"{device_help()}.")
@click.option("--dtype", type=click.Choice(choices(GenerateConfig, "dtype")))
@click.option("--compile", "compile_unet", is_flag=True, default=None,
              help="torch.compile the UNet.")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace shards made with another config.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def generate(recipe, overrides, data_root, captions_uri, out, backend, model,
             images_per_caption, guidance_scale, num_inference_steps, scheduler, size,
             stored_size, image_format, seed, batch_size, shard, all_shards, shard_from_env,
             device, dtype, compile_unet, overwrite, print_config) -> None:
    """Draw m images per caption into WebDataset shards (resumable; one shard per task).

    \b
    Examples:
      stablerep generate --data-root ./data --backend tiny -m 4 --size 64
      stablerep generate --data-root gs://bucket/run1 --shard 17          # one shard
      stablerep generate --data-root gs://bucket/run1 --shard-from-env    # Indexed Job
    """
    flags = {"captions": captions_uri, "out": out, "backend": backend, "model": model,
             "images_per_caption": images_per_caption, "guidance_scale": guidance_scale,
             "num_inference_steps": num_inference_steps, "scheduler": scheduler,
             "height": size, "width": size, "stored_size": stored_size,
             "image_format": image_format, "seed": seed, "batch_size": batch_size,
             "shard": shard, "all_shards": all_shards, "shard_from_env": shard_from_env,
             "device": device, "dtype": dtype, "compile": compile_unet, "overwrite": overwrite}
    cfg = command_config(recipe, overrides, "generate", flags, data_root=data_root,
                       print_config=print_config)
    if cfg is None:
        return
    r = stages.run_generate(cfg)
    click.echo(f"generate: {r.shards_written} shard(s) written, {r.shards_skipped} already "
               f"done; {r.images:,} images"
               + (f" at {r.images_per_s:,.2f} img/s" if r.images_per_s else "")
               + (f"; {r.failed_captions} captions failed" if r.failed_captions else ""))
    click.echo(f"generate: images in {r.uri}")


@main.command()
@_common
@click.option("--data", "data", multiple=True, metavar="URI",
              help="Images folder (repeatable) [default: <data-root>/images].")
@click.option("--out", metavar="URI", help="Output folder [default: <data-root>/train].")
@click.option("--method", type=click.Choice(choices(TrainConfig, "method")))
@click.option("--model", help="timm ViT name, e.g. vit_base_patch16_224 or vit_tiny.")
@click.option("--image-size", type=int, help="Training resolution.")
@click.option("--captions-per-batch", type=int, help="Captions per step over all ranks.")
@click.option("--images-per-caption", "-k", type=int, help="Images used per caption.")
@click.option("--epochs", type=float, help="Passes over the captions.")
@click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--num-workers", type=int, help="Data loader processes per rank.")
@click.option("--seed", type=int)
@click.option("--device", help=f"{device_help(indexed=False)} (rank i uses GPU i of its node).")
@click.option("--no-verify", "no_verify", is_flag=True, default=None,
              help="Skip the sha256 check of each shard (huge shards on trusted storage).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def train(recipe, overrides, data_root, data, out, method, model, image_size,
          captions_per_batch, images_per_caption, epochs, max_steps, num_workers, seed, device,
          no_verify, print_config) -> None:
    """Train a ViT with StableRep (or StableRep+, SimCLR, CLIP) on generated shards.

    Runs as one process, or under torchrun on many (it reads RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/PORT); resumes from <out>/latest.json when it exists.

    \b
    Examples:
      stablerep train --data-root ./data --model vit_tiny --image-size 32 --max-steps 50
      torchrun --nproc_per_node 8 -m stablerep.train --config configs/cc12m.yaml
    """
    flags = {"data": data, "out": out, "method": method, "model": model,
             "image_size": image_size, "captions_per_batch": captions_per_batch,
             "images_per_caption": images_per_caption, "epochs": epochs,
             "max_steps": max_steps, "num_workers": num_workers, "seed": seed,
             "device": device, "verify_shards": False if no_verify else None}
    cfg = command_config(recipe, overrides, "train", flags, data_root=data_root,
                       print_config=print_config)
    if cfg is None:
        return
    result = stages.run_training(cfg)
    if stages.is_main_process():
        click.echo(f"train: {result.steps} steps, final loss {result.final_loss:.4f}, "
                   f"{result.images_per_s:,.1f} img/s")
        click.echo(f"train: checkpoint {result.checkpoint}; backbone {result.backbone}; "
                   f"metrics {result.metrics}")


@main.command(name="eval")
@_common
@click.option("--checkpoint", metavar="URI|timm:NAME",
              help="Training folder, ckpt-*.pt, backbone.pt or timm:<name> "
                   "[default: <data-root>/train].")
@click.option("--datasets", metavar="LIST",
              help="Comma-separated: sklearn:digits, imagefolder:<URI>, torchvision:<Name>.")
@click.option("--out", metavar="URI", help="Output folder [default: <data-root>/eval].")
@click.option("--baseline", metavar="random|none|URI",
              help="Backbone to compare with [default: random init of the same model].")
@click.option("--episodes", "few_shot_episodes", type=int, help="Few-shot episodes.")
@click.option("--device", help=f"{device_help()}.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def evaluate(recipe, overrides, data_root, checkpoint, datasets, out, baseline,
             few_shot_episodes, device, print_config) -> None:
    """Linear probe, few-shot and kNN on frozen features, with an HTML report.

    \b
    Examples:
      stablerep eval --data-root ./data                       # the run's own checkpoint
      stablerep eval --checkpoint gs://b/run1/train \\
          --datasets sklearn:digits,imagefolder:gs://b/pets --out gs://b/run1/eval
    """
    flags = {"checkpoint": checkpoint, "out": out, "baseline": baseline,
             "few_shot_episodes": few_shot_episodes, "device": device,
             "datasets": [d.strip() for d in datasets.split(",") if d.strip()]
             if datasets else None}
    cfg = command_config(recipe, overrides, "eval", flags, data_root=data_root,
                       print_config=print_config)
    if cfg is None:
        return
    result = stages.run_eval(cfg)
    metrics = result.metrics
    for name, scores in metrics["datasets"].items():
        base = metrics.get("baseline", {}).get("datasets", {}).get(name, {})
        click.echo(f"eval: {name}: " + _summary(scores, base))
    click.echo(f"eval: report {result.report_html}; metrics {result.metrics_uri}")


@main.command()
@_common
@click.option("--arms", metavar="LIST",
              help="Comma-separated arms: random, simclr, stablerep_k2, stablerep_k4, "
                   "stablerep_k8, stablerep_plus_k4, clip [default: all].")
@click.option("--seeds", metavar="LIST", help="Comma-separated seeds [default: 0,1,2].")
@click.option("--out", metavar="URI", help="Results folder [default: <data-root>/repro].")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def repro(recipe, overrides, data_root, arms, seeds, out, print_config) -> None:
    """The paper's claims in miniature: every arm x seed on the same images, one table.

    Runs the caption, generation, training and evaluation stages (recipe `repro` by
    default: procedural digits on the CPU) and writes results.json, results.md, results.png
    and report.html.

    \b
    Examples:
      stablerep repro                                   # the full experiment
      stablerep repro --arms random,stablerep_k4 --seeds 0,1 --set train.max_steps=100
    """
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        raise click.BadParameter(f"got {seeds!r}, expected comma-separated integers",
                                 param_hint="--seeds") from None
    flags = {"arms": [a.strip() for a in arms.split(",") if a.strip()] if arms else None,
             "seeds": seed_list, "out": out}
    cfg = command_config(recipe or "repro", overrides, "repro", flags, data_root=data_root,
                       print_config=print_config)
    if cfg is None:
        return
    from stablerep.repro import run_repro

    run_repro(cfg)


def _summary(result: dict, base: dict) -> str:
    parts = []
    for key, label in (("linear_probe", "probe top-1"), ("few_shot", "few-shot"),
                       ("knn", "kNN")):
        if key in result:
            value = result[key]["top1" if key != "few_shot" else "mean"]
            text = f"{label} {value:.3f}"
            if key in base:
                text += f" (baseline {base[key]['top1' if key != 'few_shot' else 'mean']:.3f})"
            parts.append(text)
    return ", ".join(parts)


def _add_groups() -> None:
    from stablerep.k8s.cli import k8s
    from stablerep.pipeline_cli import pipeline

    main.add_command(k8s)
    main.add_command(pipeline)


_add_groups()

if __name__ == "__main__":
    main()
