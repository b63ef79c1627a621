"""Export: the adapter directory the server serves (adapter_config.json + adapter_model.safetensors).

PEFT kinds: `PeftModel.save_pretrained` as is (prefix tuning's reparameterisation MLP is folded into
`prompt_embeddings` by peft itself); bottleneck: `server.adapters.formats.write_bottleneck`.
A classification adapter also records its label names where formats.py reads them:
adapter_config.json {"lorafleet": {"labels": [...]}}.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from server.adapters import formats
from server.model.shape import BaseModelShape
from trainer.bottleneck import head_of
from trainer.methods import AdapterModule


def export_adapter(module: AdapterModule, out: Path, labels: tuple[str, ...], model_config: dict) -> Path:
    """Write the adapter files into `out` (created if needed; each file replaced atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        if module.method == "bottleneck":
            bm = module.inner
            formats.write_bottleneck(tmp, bm.adapters.targets(), BaseModelShape.from_hf_config(model_config),
                                     head_of(bm, labels))
        else:
            module.inner.save_pretrained(str(tmp))
            if labels:
                path = tmp / formats.CONFIG_FILE
                cfg = json.loads(path.read_text())
                cfg[formats.LABELS_KEY] = {"labels": list(labels)}
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
