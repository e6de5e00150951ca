"""Registers MEDS with veRL when imported: the `meds` engine vendor and the `meds` v1 trainer mode.

Name it in every veRL process's environment, `VERL_USE_EXTERNAL_MODULES=meds_client.integrations.verl.plugin`
(veRL imports it on `import verl`), next to `VERL_ENGINE_VENDOR=meds`.
"""

from . import engine, trainer

__all__ = ["engine", "trainer"]
