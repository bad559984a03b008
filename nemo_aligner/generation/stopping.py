"""Stop strings: end a response once its decoded text contains one of them."""

from nemo_aligner.generation.engine import GenerationError


class StopStringMatcher:
    """Checks the tail of a response's decoded text for any of ``stop_strings``.

    Only the last ``window`` tokens are decoded each step (decoding the whole response every
    step would cost O(length^2)). A stop string of ``c`` characters that ends in the newest
    token spans at most ``c`` tokens that each decode to at least one character, plus
    tokens that decode to nothing on their own (byte pieces), so ``2 c + 8`` tokens cover
    it with a margin. The string stays in the response (token ids and text).
    """

    def __init__(self, tokenizer, stop_strings):
        self.stop_strings = tuple(stop_strings)
        if self.stop_strings and tokenizer is None:
            raise GenerationError(
                "sampling.stop_strings needs a tokenizer; build the engine with tokenizer=..."
            )
        self.tokenizer = tokenizer
        self.window = 2 * max((len(s) for s in self.stop_strings), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def matches(self, response_ids: list[int]) -> bool:
        text = self.tokenizer.ids_to_text(response_ids[-self.window:])
        return any(s in text for s in self.stop_strings)
