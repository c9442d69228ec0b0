"""The schema of every artifact that crosses a stage boundary, checked on write and on read."""

from data_contracts.base import Contract, ContractViolation, RowRule, check_structure, enforce
from data_contracts.conversations import CONVERSATIONS
from data_contracts.formatted import FORMATTED
from data_contracts.pairs import PAIRS
from data_contracts.paraphrases import PARAPHRASES
from data_contracts.quarantine import QUARANTINE
from data_contracts.raw import RAW
from data_contracts.tokens import TOKENS

CONTRACTS = {c.name: c for c in (RAW, CONVERSATIONS, PARAPHRASES, FORMATTED, TOKENS, PAIRS, QUARANTINE)}

__all__ = ["Contract", "ContractViolation", "RowRule", "check_structure", "enforce", "CONTRACTS",
           "RAW", "CONVERSATIONS", "PARAPHRASES", "FORMATTED", "TOKENS", "PAIRS", "QUARANTINE"]
