"""Write Parquet whose `answer` column is encrypted (Parquet modular encryption, plaintext footer).

Any reader that touches `answer` without the keys fails, while every other column reads normally: a file like this
proves that a code path never reads the answers. The in-test KMS "wraps" a data key by prefixing the master key:
enough to gate decryption, not security.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

MASTER_KEYS = {"footer_key": b"0123456789abcdef", "answer_key": b"fedcba9876543210"}


class ToyKms(pe.KmsClient):
    def __init__(self, config: pe.KmsConnectionConfig) -> None:
        super().__init__()

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
        return base64.b64encode(MASTER_KEYS[master_key_identifier] + key_bytes)

    def unwrap_key(self, wrapped_key: bytes, master_key_identifier: str) -> bytes:
        raw = base64.b64decode(wrapped_key)
        assert raw[:16] == MASTER_KEYS[master_key_identifier]
        return raw[16:]


def crypto() -> tuple[pe.CryptoFactory, pe.KmsConnectionConfig]:
    return pe.CryptoFactory(lambda config: ToyKms(config)), pe.KmsConnectionConfig()


def write_with_encrypted_answer(table: pa.Table, path: Path, row_group_size: int = 128) -> Path:
    factory, kms = crypto()
    encryption = pe.EncryptionConfiguration(
        footer_key="footer_key", column_keys={"answer_key": ["answer"]}, plaintext_footer=True, double_wrapping=False
    )
    props = factory.file_encryption_properties(kms, encryption)
    with pq.ParquetWriter(path, table.schema, encryption_properties=props) as w:
        w.write_table(table, row_group_size=row_group_size)
    return path


def decryption_properties() -> pe.FileDecryptionProperties:
    factory, kms = crypto()
    return factory.file_decryption_properties(kms, pe.DecryptionConfiguration())
