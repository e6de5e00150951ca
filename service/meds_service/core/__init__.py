"""The MEDS algorithm as pure functions over numpy arrays: no web, store or index imports here."""
