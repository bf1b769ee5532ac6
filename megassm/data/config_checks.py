"""What a config must agree with in its data, checked at load by the config gate (``megassm/run_config.py``)
before any process group, model or run directory exists.

``check_buckets(cfg, manifests)``  data.buckets / data.tokens_per_step (``token_budget.py``), raised as
        ``ConfigError``;
``apply_datasets(cfg, explicit, training)``  for ``data.kind=shards`` with local datasets:
        ``model.in_channels`` / ``model.text_dim`` are taken from the manifests when the config leaves them
        unset, else must equal them; ``data.encoded_with`` records the encoders' fingerprints (so a checkpoint
        knows what latents it was trained on). With ``training`` (a config loaded to train, not to plan or
        inspect): every ``data.paths`` entry is a finished dataset that holds samples; the previews' VAE and
        text encoder are the data's; a checkpoint resumed or warm-started from (``init_from``) was trained
        with the same input widths (and, resumed, the same encoders; warm-started from other encoders: a
        warning). Returns notes and warnings for the log.

Remote datasets (URLs, ``pipe:``) are checked by the reader when training starts.
"""

from __future__ import annotations

from pathlib import Path

from megassm.config.schema import RunConfig
from megassm.config.validate import ConfigError
from megassm.data import remote
from megassm.data.format import FormatError
from megassm.data.manifest import load_manifest
from megassm.data.token_budget import BucketError, check_config
from megassm.encoders.common import fingerprint

WIDTHS = (("in_channels", "latent_channels"), ("text_dim", "text_dim"))  # model key, manifest key
ENCODERS = (("vae", "VAE"), ("text_encoder", "text encoder"))


def _error(msg: str) -> Exception:
    return ConfigError(msg)


def check_buckets(cfg: RunConfig, manifests: bool = True) -> None:
    """data.buckets / data.tokens_per_step (megassm/data/token_budget.py): every bucket's tokens split over
    cp x tp; with ``manifests`` (at load, not for a checkpoint's stored config) the local datasets' shape
    histograms hold the buckets' shapes (or, without buckets, only shapes that split)."""
    try:
        check_config(cfg, manifests)
    except (BucketError, FormatError) as e:
        raise ConfigError(str(e)) from None


def _local_manifests(cfg: RunConfig, training: bool) -> list[tuple[str, dict]]:
    """(path, manifest) of every local ``data.paths`` entry; ``training``: a missing, unfinished or empty dataset
    raises (else it is left out)."""
    out = []
    for i, p in enumerate(cfg.data.paths):
        if not remote.is_local(str(p)):
            continue
        local = Path(remote.local_path(str(p)))
        if not training and not (local / "manifest.json").is_file():
            continue
        if not local.is_dir():
            raise _error(f"data.paths[{i}]={p!r}: no such directory ({local.resolve()}); give a dataset directory "
                         "written by `megassm preprocess --output DIR`")
        try:
            m = load_manifest(str(p))
        except FormatError as e:
            raise _error(f"data.paths[{i}]: {e}") from None
        if training and (not m["shards"] or not m.get("num_samples", 1)):
            skipped = m.get("inputs", {}).get("skipped") or {}
            why = (", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no input was found")
            raise _error(f"data.paths[{i}]={p!r} holds no samples ({why}; see "
                         f"{local / m.get('skip_report', 'skipped.json')}); preprocess usable inputs into it, "
                         "or drop it from data.paths")
        out.append((str(p), m))
    return out


def _widths(cfg: RunConfig, found: list[tuple[str, dict]], explicit: set[str]) -> list[str]:
    """model.in_channels / model.text_dim from the manifests, or checked against them."""
    notes = []
    for key, mkey in WIDTHS:
        values = {path: m.get(mkey) for path, m in found if m.get(mkey) is not None}
        if not values:
            continue
        if len(set(values.values())) > 1:
            raise _error(f"data.paths: the datasets differ in {mkey} ({values}); one model cannot train on all of "
                         "them: preprocess them with the same encoders")
        path, value = next(iter(values.items()))
        have = getattr(cfg.model, key)
        if f"model.{key}" not in explicit:
            notes.append(f"model.{key}={value} from the manifest of {path} (the config leaves it unset)")
            setattr(cfg.model, key, int(value))
        elif have != value:
            raise _error(f"model.{key}={have} but dataset {path} has {mkey}={value} (its manifest.json); set "
                         f"model.{key}={value}, or leave model.{key} out of the config to take it from the data")
    return notes


def _fingerprints(found: list[tuple[str, dict]]) -> dict[str, str]:
    """{"vae": fp, "text_encoder": fp} of the first dataset that records them."""
    out: dict[str, str] = {}
    for _, m in found:
        for kind, _ in ENCODERS:
            fp = (m.get(kind) or {}).get("fingerprint")
            if fp and kind not in out:
                out[kind] = str(fp)
    return out


def _check_preview_encoders(cfg: RunConfig, found: list[tuple[str, dict]]) -> None:
    """Previews and evaluation decode with encoders.vae and encode prompts with encoders.text_encoder: they
    must be the encoders the data was written with (a builtin one only for synthetic data)."""
    t = cfg.train
    if not found or (t.sample_every <= 0 and t.eval_every <= 0):
        return
    path, m = found[0]
    for kind, what in ENCODERS:
        ident = m.get(kind) or {}
        if ident.get("class") in (None, "synthetic"):
            continue
        have = getattr(cfg.encoders, kind)
        fix = (f"set encoders.{kind}={ident.get('path') or 'DIR'} (the {what} that wrote {path}), or "
               "train.sample_every=0 train.eval_every=0")
        if have.startswith("builtin:"):
            raise _error(f"encoders.{kind}={have!r} but dataset {path} was encoded with the {what} "
                         f"{ident.get('class')} {ident.get('name')!r}: previews and evaluation would read its "
                         f"latents with the wrong {what}; {fix}")
        d = Path(have)
        if not (d / "config.json").is_file():
            raise _error(f"encoders.{kind}={have!r}: no such {what} directory (no config.json); {fix}")
        fp = fingerprint(d)
        if fp != ident.get("fingerprint"):
            raise _error(f"encoders.{kind}={have!r} (fingerprint {fp}) is not the {what} dataset {path} was "
                         f"encoded with ({ident.get('class')} {ident.get('name')!r}, fingerprint "
                         f"{ident.get('fingerprint')}); {fix}")


def stored_run_config(path: str | Path) -> dict | None:
    """The RunConfig dict stored with a checkpoint (consolidated / sharded / run dir / checkpoints/ / step_*)."""
    import json

    import yaml

    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        for name in ("config.yaml", "config.json"):
            f = d / name
            if f.is_file():
                try:
                    text = f.read_text()
                    data = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
                except (OSError, ValueError, yaml.YAMLError):
                    return None
                return data if isinstance(data, dict) else None
    return None


def check_checkpoint(cfg: RunConfig, what: str, stored: dict | None, resume: bool) -> list[str]:
    """A checkpoint (``what``: 'init_from=X' or the run's own) trained with other input widths (an error: its
    weights cannot take the inputs) or other encoders than this config's data: an error for a resume (the
    data changed under the run), a warning returned for a warm start (a deliberate change of encoder, then
    adapted to, is possible)."""
    if not stored:
        return []
    model = stored.get("model") or {}
    for key, _ in WIDTHS:
        old, new = model.get(key), getattr(cfg.model, key)
        if old is not None and old != new:
            raise _error(f"{what} was trained with model.{key}={old}, this config has model.{key}={new} (from "
                         f"{'the data' if cfg.data.kind == 'shards' else 'the config'}); its weights cannot take "
                         "these inputs: train on data encoded like the checkpoint's, or start without it")
    old_fp = (stored.get("data") or {}).get("encoded_with") or {}
    found = []
    for kind, name in ENCODERS:
        a, b = old_fp.get(kind), cfg.data.encoded_with.get(kind)
        if a and b and a != b:
            found.append(f"{what} was trained on latents of another {name} (fingerprint {a}) than data.paths "
                         f"(fingerprint {b}, see `megassm inspect data`)")
    if found and resume:
        raise _error("; ".join(found) + ": resume on the data the run was trained on, or start a new run_dir")
    return [f"{msg}: the model starts from weights that read another latent space" for msg in found]


def apply_datasets(cfg: RunConfig, explicit: set[str], training: bool = True) -> tuple[list[str], list[str]]:
    """The load-time data rules (module doc); fills model widths and ``data.encoded_with``; returns (notes,
    warnings) for the log."""
    notes: list[str] = []
    if cfg.data.kind == "shards":
        found = _local_manifests(cfg, training)
        notes += _widths(cfg, found, explicit)
        cfg.data.encoded_with = _fingerprints(found)
        if training:
            _check_preview_encoders(cfg, found)
    if not training:
        return notes, []
    run_dir = Path(cfg.run_dir)
    if (run_dir / "checkpoints" / "latest").is_file():  # a resume: init_from is not read
        check_checkpoint(cfg, f"the checkpoint in run_dir={cfg.run_dir} (resumed automatically)",
                         stored_run_config(run_dir), resume=True)
        return notes, []
    if cfg.init_from:
        return notes, check_checkpoint(cfg, f"init_from={cfg.init_from}", stored_run_config(cfg.init_from),
                                       resume=False)
    return notes, []
