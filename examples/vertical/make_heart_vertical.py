"""Regenerate the two vertical Heart files from the embedded UCI Heart Disease table (deterministic).

A clinic holds the label, demographics and intake vitals; a cardiology lab holds the chest-pain
assessment, ECG, stress test and fasting blood sugar. Each side misses a seeded 15 % of the other
side's patients, so that alignment (PSI) matters. Run from the repo root:

    python examples/vertical/make_heart_vertical.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "fedcollab" / "data" / "embedded"
CLINIC = ["id", "age", "sex", "trestbps", "chol", "num"]
LAB = ["id", "cp", "fbs", "restecg", "thalch", "exang", "oldpeak"]
MISSING_SHARE = 0.15
SEED = 16


def main() -> None:
    df = pd.read_csv(EMBEDDED / "heart_disease_uci.csv")
    rng = np.random.default_rng(SEED)
    ids = df["id"].to_numpy()
    only_one = rng.permutation(ids)[: int(round(2 * MISSING_SHARE * len(ids)))]
    clinic_missing = set(only_one[: len(only_one) // 2])  # patients the clinic has no record of
    lab_missing = set(only_one[len(only_one) // 2 :])  # patients never sent to the lab
    clinic = df.loc[~df["id"].isin(clinic_missing), CLINIC].sample(frac=1.0, random_state=SEED)  # each side's own order
    lab = df.loc[~df["id"].isin(lab_missing), LAB].sample(frac=1.0, random_state=SEED + 1)
    clinic.to_csv(EMBEDDED / "heart_vertical_clinic.csv", index=False)
    lab.to_csv(EMBEDDED / "heart_vertical_lab.csv", index=False)
    print(f"clinic {len(clinic)} rows, lab {len(lab)} rows, both {len(set(clinic.id) & set(lab.id))}")


if __name__ == "__main__":
    main()
