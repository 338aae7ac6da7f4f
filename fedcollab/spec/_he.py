"""The ``[he]`` table: server-blind aggregation under homomorphic encryption (aggregation = "he")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from fedcollab.core import FrozenModel

# The same constraints as ``_models.Name`` / ``_models.Finite`` (that module imports this one).
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]

#: (t - 1) / 2 of the default BFV parameters (``fedcollab.crypto.BFV_4096``, t = 16,760,833);
#: kept here as a number because the spec layer sits below crypto (a test checks they agree).
HE_MAX_ABS = 8_380_416


class HeSpec(FrozenModel):
    """Homomorphic encryption (TenSEAL BFV): the coordinator adds ciphertexts and never sees a model."""

    scheme: Literal["bfv"] = Field(default="bfv", description="HE scheme: BFV with fixed point (exact integer arithmetic). CKKS is not offered: its approximate decryptions, if they reached the coordinator, would leak the key.")
    parameters: Literal["bfv-4096-t24"] = Field(default="bfv-4096-t24", description="Parameter set: N = 4096, coefficient modulus [40, 60] bits (128-bit security), plaintext modulus t = 16,760,833; see docs/he.md.")
    key_holder: Name | None = Field(default=None, description="Partner that generates the HE secret key and sends it, sealed and signed, to every other partner; default the first partner.")
    model_writer: Name | None = Field(default=None, description="Partner that decrypts the final aggregate and writes the model (the coordinator holds no plaintext model); default the key holder.")
    clip: Finite = Field(default=8.0, gt=0, description="Bound on every model parameter before fixed-point encoding (values beyond are clipped).")
    scale: Finite = Field(default=float(2**19), gt=0, description="Fixed-point scale: a node sends round(w * x * scale), w its share of the training rows. clip * scale + partners must stay below (t - 1) / 2 = 8,380,416.")

    def resolved_key_holder(self, partners: list[str]) -> str:
        """The key holder, defaulting to the first partner."""
        return self.key_holder or partners[0]

    def resolved_model_writer(self, partners: list[str]) -> str:
        """The model writer, defaulting to the key holder."""
        return self.model_writer or self.resolved_key_holder(partners)

    def problems(self, spec: Any) -> list[str]:
        """Cross-field problems of ``spec`` with aggregation = "he" (one line each)."""
        names = [p.name for p in spec.partners]
        out = []
        if len(names) < 2:
            out.append(f"aggregation = 'he' needs at least 2 partners, got {len(names)}")
        for field in ("key_holder", "model_writer"):
            v = getattr(self, field)
            if v is not None and v not in names:
                out.append(f"he.{field} = {v!r} is not a partner")
        if self.clip * self.scale + len(names) > HE_MAX_ABS:
            out.append(f"he: clip * scale + partners must be at most {HE_MAX_ABS}, got {self.clip * self.scale + len(names):.0f}")
        return out
