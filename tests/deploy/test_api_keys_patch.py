"""The optional Kubernetes patch that gives meds-api a key file: applied to the API Deployment it stays a
valid Deployment, and the file it points MEDS_API_KEYS_FILE at lies in the mounted Secret."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
PATCH = KUBERNETES / "patches" / "api-keys-file.yaml"


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The strategic merge of this patch: containers by name, env, mounts and volumes appended."""
    result = copy.deepcopy(base)
    spec, patch_spec = result["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    for patched in patch_spec["containers"]:
        [container] = [c for c in spec["containers"] if c["name"] == patched["name"]]
        for field in ("env", "volumeMounts"):
            container[field] = [*container.get(field, []), *patched.get(field, [])]
    spec["volumes"] = [*spec.get("volumes", []), *patch_spec["volumes"]]
    return result


def test_the_patch_mounts_the_key_file_and_keeps_the_deployment_valid() -> None:
    patch = yaml.safe_load(PATCH.read_text())
    api = yaml.safe_load((KUBERNETES / "api-deployment.yaml").read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == (api["kind"], api["metadata"]["name"])
    deployment = merged(api, patch)
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api"]
    [path] = [e["value"] for e in container["env"] if e["name"] == "MEDS_API_KEYS_FILE"]
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "meds-api-keys-file"
    assert Path(path).name in PATCH.read_text().split("--from-file=")[1].split()[0]  # the Secret's key
    latest = max((Version(v) for v in all_versions()), default=None)
    assert latest is not None
    kubernetes_validate.validate(deployment, str(latest), strict=True)
