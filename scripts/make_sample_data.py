"""Make the sample data in data/sample/ (deterministic: same seed, same bytes).

    python scripts/make_sample_data.py            # rewrite data/sample/*
    python scripts/make_sample_data.py --catalog 5000 --out .loraflow/gpu_8b   # only anime_catalog.csv, 5,000 titles
    from scripts.make_sample_data import make_catalog; make_catalog(25_000, seed=1)   # benchmarks

Every anime title, studio, producer, licensor and character is invented (syllables and word lists), so no
model has seen them: a fine-tuned model that answers about them learned it from this data. The catalog has
MyAnimeList's columns and quirks: `UNKNOWN` gaps, commas and quotes inside values, multi-line synopses.
Its first `complete_rows` rows have every field the anime_qa synthesizer asks about, and short synopses,
because the CPU demo trains on the first rows.
"""

import argparse
import json
import random
from datetime import date, timedelta
from pathlib import Path

import pandas as pd

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
SEED = 20261122

COLUMNS = [
    "anime_id", "Name", "English name", "Other name", "Score", "Genres", "Synopsis", "Type", "Episodes", "Aired",
    "Premiered", "Status", "Producers", "Licensors", "Studios", "Source", "Duration", "Rating", "Rank",
    "Popularity", "Favorites", "Scored By", "Members",
]
# The fields anime_qa asks about: never UNKNOWN in the first complete_rows rows.
QA_FIELDS = ["Name", "English name", "Other name", "Genres", "Synopsis", "Episodes", "Producers", "Studios", "Rating", "Score", "Scored By"]

# ---- invented words: romaji syllables with their kana, so "Other name" is the title's own spelling
KANA = {
    "ka": ("か", "カ"), "ki": ("き", "キ"), "ku": ("く", "ク"), "ke": ("け", "ケ"), "ko": ("こ", "コ"),
    "sa": ("さ", "サ"), "shi": ("し", "シ"), "su": ("す", "ス"), "se": ("せ", "セ"), "so": ("そ", "ソ"),
    "ta": ("た", "タ"), "chi": ("ち", "チ"), "tsu": ("つ", "ツ"), "te": ("て", "テ"), "to": ("と", "ト"),
    "na": ("な", "ナ"), "ni": ("に", "ニ"), "nu": ("ぬ", "ヌ"), "ne": ("ね", "ネ"), "no": ("の", "ノ"),
    "ha": ("は", "ハ"), "hi": ("ひ", "ヒ"), "fu": ("ふ", "フ"), "ho": ("ほ", "ホ"), "ma": ("ま", "マ"),
    "mi": ("み", "ミ"), "mu": ("む", "ム"), "me": ("め", "メ"), "mo": ("も", "モ"), "ya": ("や", "ヤ"),
    "yu": ("ゆ", "ユ"), "yo": ("よ", "ヨ"), "ra": ("ら", "ラ"), "ri": ("り", "リ"), "ru": ("る", "ル"),
    "re": ("れ", "レ"), "ro": ("ろ", "ロ"), "wa": ("わ", "ワ"), "ga": ("が", "ガ"), "gi": ("ぎ", "ギ"),
    "go": ("ご", "ゴ"), "za": ("ざ", "ザ"), "ju": ("じゅ", "ジュ"), "da": ("だ", "ダ"), "do": ("ど", "ド"),
    "ba": ("ば", "バ"), "bi": ("び", "ビ"), "be": ("べ", "ベ"), "ryu": ("りゅ", "リュ"), "kyo": ("きょ", "キョ"),
}
SYLLABLES = list(KANA)
FINAL_N = ("n", ("ん", "ン"))
TITLE_SUFFIXES = [  # (romaji, kanji): genre words around an invented name
    ("Monogatari", "物語"), ("Senki", "戦記"), ("Gakuen", "学園"), ("Kitan", "奇譚"), ("Densetsu", "伝説"),
    ("Nikki", "日記"), ("Tantei", "探偵"), ("Kishi", "騎士"), ("Kaizoku", "海賊"), ("Ryokou", "旅行"),
    ("Shokudou", "食堂"), ("Kenshi", "剣士"), ("Mahou", "魔法"), ("Yoru", "夜"), ("Kikou", "紀行"),
]
PLACE_SYLLABLES = ["vey", "ra", "lor", "an", "thes", "mar", "ol", "quen", "dal", "is", "bren", "ny", "cor", "ve",
                   "tal", "ith", "sor", "en", "wyl", "dru", "ka", "ro", "mir", "el"]
ADJECTIVES = ["Silver", "Hollow", "Quiet", "Crimson", "Paper", "Clockwork", "Drifting", "Last", "Seventh",
              "Lantern-lit", "Broken", "Sleepless", "Velvet", "Northern", "Glass", "Forgotten", "Tin", "Wandering",
              "Midnight", "Copper", "Faded", "Hidden", "Borrowed", "Salt"]
NOUNS = ["Lantern", "Orchard", "Tide", "Archive", "Garden", "Comet", "Workshop", "Harbor", "Crown", "Compass",
         "Mirror", "Kite", "Bell", "Ferry", "Lighthouse", "Greenhouse", "Atlas", "Chorus", "Foxfire", "Observatory",
         "Carousel", "Teahouse", "Signal", "Meadow"]
ENGLISH_PATTERNS = [
    "The {adj} {noun} of {place}", "{place} {noun} Club", "{adj} {noun}", "My {adj} {noun}",
    "{nouns} of {place}", "The {noun} at the End of {place}", "{place}: {adj} {noun}", "{adj} {noun} Academy",
]
ODD_ENGLISH = ['Hello, {place}!', 'The "{adj}" {noun}', "{noun}, {noun2} and {place}", "Don't Call It a {noun}"]

GENRES = ["Action", "Adventure", "Comedy", "Drama", "Fantasy", "Romance", "Sci-Fi", "Slice of Life", "Mystery",
          "Supernatural", "Sports", "Suspense", "Horror", "Gourmet", "Award Winning"]
STUDIO_WORDS = ["Kanrei", "Mirokuza", "Tenpaku", "Hoshiyume", "Sorabune", "Kagetsu", "Aoneko", "Furubi", "Yukimaru",
                "Tsukiori", "Benizora", "Hanagane"]
STUDIO_FORMS = ["Studio {w}", "{w} Animation", "{w} Works", "{w} Pictures", "Team {w}"]
PRODUCERS = ["Hoshimura Pictures", "Tenkuu Records", "Kazeoto Media", "Mizuhara Shoten", "Ginrei Music", "Nanairo TV",
             "Akebono Sound", "Kurofune Games", "Sakuyama Bunko", "Umihara Broadcasting", "Hikaridou",
             "Rindou Entertainment", "Yamabuki Publishing", "Komorebi Works", "Tsubakiya Shoji"]
LICENSORS = ["Lanternlight Media", "Bluefin Distribution", "Northstar Animation", "Paperkite Entertainment",
             "Evergreen Screen", "Harborline Films"]
TYPES = [("TV", 55), ("Movie", 14), ("OVA", 10), ("ONA", 13), ("Special", 8)]
SOURCES = ["Original", "Manga", "Light novel", "Web manga", "Visual novel", "Novel", "Game", "4-koma manga"]
RATINGS = ["PG-13 - Teens 13 or older", "R - 17+ (violence & profanity)", "G - All Ages", "PG - Children",
           "R+ - Mild Nudity"]
SEASONS = {1: "winter", 4: "spring", 7: "summer", 10: "fall"}

# ---- synopsis pieces
SETTINGS = ["floating city", "mountain village", "seaside town", "walled capital", "desert caravan city",
            "snowbound academy", "river port", "underground market", "island observatory", "forest shrine"]
ROLES = ["apprentice clockmaker", "retired swordsman", "shy librarian", "runaway princess", "delivery pilot",
         "failed magician", "transfer student", "street cook", "lighthouse keeper", "young cartographer",
         "detective's assistant", "tea shop owner"]
TRAITS = ["a talent for lying", "a broken compass", "no memory of last winter", "a very loud cat", "a secret debt",
          "a voice that can calm storms", "an allergy to magic", "a notebook full of maps", "a grudge against the moon"]
EVENTS = ["finds a letter addressed to someone who vanished fifty years ago", "wakes up with a stranger's shadow",
          "wins a lottery nobody remembers entering", "opens a door that should not exist",
          "inherits a ramen stall with a talking ladle", "hears the town bell ring thirteen times",
          "catches a falling star in a fishing net", "is mistaken for the heir of a vanished clan"]
GOALS = ["return the stolen seasons", "win the harvest festival tournament", "repair the last working airship",
         "find the author of the anonymous letters", "keep the family restaurant open",
         "map the shifting streets", "break the promise that binds the river spirit", "reach the top of the tower"]
DEADLINES = ["the winter solstice", "the next eclipse", "graduation day", "the festival ends",
             "the tide swallows the old pier", "the last train leaves"]
THEMES = ["friendship", "grief", "courage", "home", "first love", "growing up", "forgiveness", "ambition",
          "loyalty", "memory"]
QUOTES = ["Nobody gets lost on purpose, but some of us get found that way.", "If the map is wrong, draw a better one.",
          "A promise is only heavy if you carry it alone.", "Tomorrow is just today with better timing."]
MIDDLES = [
    "Joined by {c2}, {a_role2} with {trait}, {c1} sets out to {goal} before {deadline}.",
    "Nobody in {place} believes {pos} story, least of all {c2}.",
    "Every answer {c1} finds only raises two more questions, and the town's oldest families seem to know why.",
    "Along the way, {pro} meets {c3}, {a_role3} who seems to know far too much about {pos} past.",
    "The rules are simple, yet breaking them has a price that grows with every sunrise.",
    "What begins as an errand soon becomes a race against people who would rather the truth stay buried.",
    "Between lessons, odd jobs and long nights on the rooftops, {c1} slowly learns what {pro} is fighting for.",
    "As {c2} puts it, \"{quote}\"",
    "Old rivals return, new friends hide secrets, and the {setting} itself seems to be watching.",
    "When the festival lanterns go dark, {c1} has to choose between an easy life and a difficult truth.",
    "The journey takes {obj} through markets, ruins and one extremely stubborn toll bridge.",
    "Meanwhile, {c3} keeps a list of everything that has gone wrong, and it is getting longer.",
    "Each episode stands on its own, but small clues gather into a larger mystery.",
    "Friendships are tested, recipes are ruined, and at least one ship is lost at sea.",
]


def make_catalog(n_rows: int, seed: int = SEED, *, complete_rows: int = 0, synopsis_words: tuple[int, int] = (40, 160),
                 complete_synopsis_words: tuple[int, int] = (40, 60)) -> pd.DataFrame:
    """A catalog of `n_rows` invented anime with MyAnimeList's columns, all values as text (like the CSV).

    The first `complete_rows` rows have no UNKNOWN in the fields anime_qa uses, plain single-line synopses of
    `complete_synopsis_words` words; the rest have realistic gaps and synopses of `synopsis_words` words.
    """
    rng = random.Random(seed)
    studios = [form.format(w=word) for word, form in zip(STUDIO_WORDS, STUDIO_FORMS * 3)]
    used_names: set[str] = set()
    used_english: set[str] = set()
    anime_id = 0
    records = []
    for index in range(n_rows):
        complete = index < complete_rows
        anime_id += rng.randint(1, 37)
        name, other_name = _unique(rng, used_names, lambda: _japanese_title(rng))
        english = _unique(rng, used_english, lambda: _english_title(rng, odd=not complete and rng.random() < 0.06))
        kind = _weighted(rng, TYPES)
        episodes = _episodes(rng, kind)
        aired, premiered, status = _aired(rng, kind, episodes)
        score = min(9.31, max(4.2, rng.gauss(6.95, 0.75)))
        scored_by = int(min(2_000_000, rng.lognormvariate(9.6, 1.5))) + 50
        members = int(scored_by * rng.uniform(1.4, 3.2))
        words = complete_synopsis_words if complete else synopsis_words
        record = {
            "anime_id": str(anime_id), "Name": name, "English name": english, "Other name": other_name,
            "Score": f"{score:.2f}", "Genres": ", ".join(sorted(rng.sample(GENRES, rng.randint(1, 4)), key=GENRES.index)),
            "Synopsis": _synopsis(rng, name, words, multiline=not complete and rng.random() < 0.04),
            "Type": kind, "Episodes": str(episodes), "Aired": aired, "Premiered": premiered, "Status": status,
            "Producers": ", ".join(rng.sample(PRODUCERS, rng.randint(1, 3))),
            "Licensors": ", ".join(rng.sample(LICENSORS, 1)) if rng.random() < 0.9 else "UNKNOWN",
            "Studios": rng.choice(studios), "Source": rng.choice(SOURCES), "Duration": _duration(rng, kind),
            "Rating": rng.choice(RATINGS), "Favorites": str(int(members * rng.uniform(0.0005, 0.02))),
            "Scored By": str(scored_by), "Members": str(members),
        }
        if complete:
            record["Licensors"] = record["Licensors"] if record["Licensors"] != "UNKNOWN" else rng.choice(LICENSORS)
        else:
            _add_gaps(rng, record)
        records.append(record)
    catalog = pd.DataFrame(records)
    _add_ranks(catalog)
    return catalog[COLUMNS]


def _unique(rng, used: set, make):
    for _ in range(1000):
        made = make()
        key = made[0] if isinstance(made, tuple) else made
        if key not in used:
            used.add(key)
            return made
    raise RuntimeError("ran out of unique titles: widen the word lists")


def _word(rng, syllables: tuple[int, int] = (2, 4)) -> tuple[str, str, str]:
    """An invented Japanese-like word: (romaji, hiragana, katakana)."""
    parts = [rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables))]
    romaji, hira, kata = "".join(parts), "".join(KANA[p][0] for p in parts), "".join(KANA[p][1] for p in parts)
    if rng.random() < 0.2:
        romaji, hira, kata = romaji + FINAL_N[0], hira + FINAL_N[1][0], kata + FINAL_N[1][1]
    return romaji.capitalize(), hira, kata


def _japanese_title(rng) -> tuple[str, str]:
    """(romanised title, native title) of an invented show."""
    first, second = _word(rng), _word(rng)
    pattern = rng.randrange(5)
    if pattern == 0:
        return f"{first[0]} no {second[0]}", f"{first[1]}の{second[1]}"
    if pattern == 1:
        romaji, kanji = rng.choice(TITLE_SUFFIXES)
        return f"{first[0]} {romaji}", f"{first[2]}{kanji}"
    if pattern == 2:
        return f"{first[0]}!", f"{first[2]}！"
    if pattern == 3:
        return f"{first[0]} {second[0]}", f"{first[2]}・{second[2]}"
    romaji, kanji = rng.choice(TITLE_SUFFIXES)
    return f"{first[0]} no {romaji}", f"{first[1]}の{kanji}"


def _place(rng) -> str:
    return "".join(rng.choice(PLACE_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _english_title(rng, odd: bool) -> str:
    pattern = rng.choice(ODD_ENGLISH if odd else ENGLISH_PATTERNS)
    noun = rng.choice(NOUNS)
    return pattern.format(adj=rng.choice(ADJECTIVES), noun=noun, nouns=_plural(noun), noun2=rng.choice(NOUNS), place=_place(rng))


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "sh", "ch")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _weighted(rng, choices):
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _episodes(rng, kind: str) -> int:
    if kind == "TV":
        return rng.choice([10, 11, 12, 12, 12, 13, 13, 24, 25, 26, 26, 39, 50, 51])
    if kind == "Movie":
        return 1
    if kind == "OVA":
        return rng.randint(1, 6)
    if kind == "ONA":
        return rng.choice([6, 8, 10, 12, 13, 24])
    return rng.randint(1, 3)


def _aired(rng, kind: str, episodes: int) -> tuple[str, str, str]:
    """(Aired, Premiered, Status) in MyAnimeList's formats."""
    start = date(1995, 1, 1) + timedelta(days=rng.randrange(365 * 29))
    if episodes == 1:
        return _date(start), "UNKNOWN", "Finished Airing"
    end = start + timedelta(weeks=episodes - 1)
    premiered = f"{SEASONS[3 * ((start.month - 1) // 3) + 1]} {start.year}" if kind == "TV" else "UNKNOWN"
    if end >= date(2024, 11, 1):
        return f"{_date(start)} to ?", premiered, "Currently Airing"
    return f"{_date(start)} to {_date(end)}", premiered, "Finished Airing"


def _date(day: date) -> str:
    return f"{day.strftime('%b')} {day.day}, {day.year}"


def _duration(rng, kind: str) -> str:
    if kind == "Movie":
        return f"1 hr {rng.randint(20, 59)} min"
    minutes = {"TV": 24, "OVA": rng.choice([25, 28, 30]), "ONA": rng.choice([3, 12, 15, 24]), "Special": rng.choice([5, 15, 24])}[kind]
    return f"{minutes} min" if kind == "Special" else f"{minutes} min per ep"


def _synopsis(rng, title: str, words: tuple[int, int], multiline: bool) -> str:
    """A plot summary of `words` words from templates, about invented characters."""
    c1, c2, c3 = (f"{_word(rng, (2, 3))[0]} {_word(rng, (2, 3))[0]}" for _ in range(3))
    pro, pos, obj = rng.choice([("he", "his", "him"), ("she", "her", "her"), ("they", "their", "them")])
    fill = {
        "c1": c1.split()[0], "c2": c2.split()[0], "c3": c3.split()[0], "pro": pro, "pos": pos, "obj": obj,
        "place": _place(rng), "setting": rng.choice(SETTINGS), "a_role2": _a(rng.choice(ROLES)), "a_role3": _a(rng.choice(ROLES)),
        "trait": rng.choice(TRAITS), "goal": rng.choice(GOALS), "deadline": rng.choice(DEADLINES), "quote": rng.choice(QUOTES),
    }
    opening = (f"In the {fill['setting']} of {fill['place']}, {c1}, {_a(str(rng.randint(14, 34)))}-year-old {rng.choice(ROLES)}, "
               f"{rng.choice(EVENTS)}.")
    closing = f"{title} is a story about {rng.choice(THEMES)} and {rng.choice(THEMES)}."
    low, high = words
    signature = "\n\n[Written by the sample-data script]" if multiline else ""
    high -= len(signature.split())
    target = rng.randint(low, high)
    sentences = [opening]
    count = len(opening.split()) + len(closing.split())
    for middle in rng.sample(MIDDLES, len(MIDDLES)):
        sentence = middle.format(**fill)
        sentence = sentence[0].upper() + sentence[1:]
        if count + len(sentence.split()) > high:
            continue
        sentences.append(sentence)
        count += len(sentence.split())
        if count >= target:
            break
    sentences.append(closing)
    if not multiline:
        return " ".join(sentences)
    half = len(sentences) // 2
    return " ".join(sentences[:half]) + "\n\n" + " ".join(sentences[half:]) + signature


def _add_gaps(rng, record: dict) -> None:
    """MyAnimeList-style UNKNOWN values (about one field in ten)."""
    for column, rate in [("English name", 0.12), ("Other name", 0.05), ("Producers", 0.10), ("Licensors", 0.10),
                         ("Episodes", 0.08), ("Studios", 0.05), ("Genres", 0.04), ("Rating", 0.03), ("Synopsis", 0.03)]:
        if rng.random() < rate:
            record[column] = "UNKNOWN"
    if rng.random() < 0.10:
        record["Score"] = record["Scored By"] = "UNKNOWN"


def _add_ranks(catalog: pd.DataFrame) -> None:
    """Rank by score among scored titles, Popularity by members (1 = best), as MyAnimeList does."""
    scores = pd.to_numeric(catalog["Score"], errors="coerce")
    catalog["Rank"] = scores.rank(ascending=False, method="first").map(lambda r: "UNKNOWN" if pd.isna(r) else str(int(r)))
    catalog["Popularity"] = catalog["Members"].astype(int).rank(ascending=False, method="first").astype(int).astype(str)


# ---- instruction, conversation and quote samples

def make_instructions(seed: int = SEED) -> list[dict]:
    """About 60 Alpaca-style rows, a third in Korean, some with an empty input."""
    rng = random.Random(seed)
    english_facts = [
        ("Name the three primary colors of paint.", "Red, yellow and blue."),
        ("How many days are in a leap year?", "A leap year has 366 days."),
        ("What is the boiling point of water at sea level in degrees Celsius?", "Water boils at 100 °C at sea level."),
        ("List the four seasons in order, starting with spring.", "Spring, summer, autumn and winter."),
        ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
        ("Explain what a noun is in one sentence.", "A noun is a word that names a person, place, thing or idea."),
        ("How many minutes are in two hours?", "Two hours have 120 minutes."),
        ("Give one tip for remembering new vocabulary.", "Review new words a little every day and use them in your own sentences."),
        ("What gas do plants take in from the air to make food?", "Plants take in carbon dioxide."),
        ("Write a one-sentence greeting for a new colleague.", "Welcome to the team, we are glad you are here!"),
    ]
    korean_facts = [
        ("한국의 수도는 어디인가요?", "한국의 수도는 서울입니다."),
        ("일주일은 며칠인가요?", "일주일은 7일입니다."),
        ("무지개의 일곱 가지 색을 말해 주세요.", "빨강, 주황, 노랑, 초록, 파랑, 남색, 보라입니다."),
        ("물의 화학식은 무엇인가요?", "물의 화학식은 H2O입니다."),
        ("1년은 몇 개월인가요?", "1년은 12개월입니다."),
    ]
    plurals = [("child", "children"), ("mouse", "mice"), ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"),
               ("tooth", "teeth")]
    words_ko = [("apple", "사과"), ("water", "물"), ("book", "책"), ("school", "학교"), ("friend", "친구"), ("rain", "비"),
                ("tree", "나무"), ("cat", "고양이")]
    sentences = ["the lantern lit the quiet harbor", "we walked home after the long festival",
                 "every map tells a different story", "the kettle sang in the small kitchen"]
    rows = [{"instruction": q, "input": "", "output": a} for q, a in english_facts + korean_facts]
    for _ in range(6):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}."})
    for celsius in rng.sample(range(-10, 45, 5), 5):
        rows.append({"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": f"{celsius} °C",
                     "output": f"{celsius} °C is {celsius * 9 // 5 + 32} °F."})
    for sentence in sentences:
        rows.append({"instruction": "Reverse the order of the words.", "input": sentence, "output": " ".join(reversed(sentence.split()))})
    rows += [sort_row("Sort the numbers from smallest to largest.", rng.sample(range(1, 100), rng.randint(3, 6))) for _ in range(5)]
    for singular, plural in plurals:
        rows.append({"instruction": "Give the plural of the noun.", "input": singular, "output": f"The plural of \"{singular}\" is \"{plural}\"."})
    for english, korean in words_ko[:4]:
        rows.append({"instruction": "Translate the word into Korean.", "input": english, "output": korean})
    for _ in range(5):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"instruction": "다음 두 수를 더하세요.", "input": f"{a}, {b}", "output": f"{a} + {b} = {a + b}입니다."})
    rows += [sort_row("다음 숫자들을 작은 것부터 순서대로 정렬하세요.", rng.sample(range(1, 100), rng.randint(3, 5))) for _ in range(4)]
    for english, korean in words_ko:
        rows.append({"instruction": "다음 영어 단어를 한국어로 번역하세요.", "input": english, "output": f"한국어로 \"{korean}\"입니다."})
    for celsius in rng.sample(range(0, 40, 5), 3):
        rows.append({"instruction": "다음 섭씨 온도를 화씨로 바꾸세요.", "input": f"{celsius}°C",
                     "output": f"섭씨 {celsius}도는 화씨 {celsius * 9 // 5 + 32}도입니다."})
    rng.shuffle(rows)
    return rows


def sort_row(instruction: str, numbers: list[int]) -> dict:
    return {"instruction": instruction, "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))}


def make_conversations(seed: int = SEED) -> list[dict]:
    """About 30 ShareGPT-style rows {id, conversations: [{from, value}]}, some multi-turn, some with a system turn."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(10):
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        divisor = rng.choice([d for d in (2, 3, 4, 6) if (a * b) % d == 0] or [1])
        conversations.append([
            {"from": "human", "value": f"What is {a} times {b}?"},
            {"from": "gpt", "value": f"{a} times {b} is {a * b}."},
            {"from": "human", "value": f"And if I divide that by {divisor}?"},
            {"from": "gpt", "value": f"{a * b} divided by {divisor} is {a * b // divisor}."},
        ])
    for meters in rng.sample(range(2, 40), 8):
        conversations.append([
            {"from": "human", "value": f"How many centimeters are in {meters} meters?"},
            {"from": "gpt", "value": f"{meters} meters is {meters * 100} centimeters."},
        ])
    for word in ["lantern", "harbor", "orchard", "compass", "teapot", "meadow"]:
        conversations.append([
            {"from": "system", "value": "You are a concise assistant. Answer in one sentence."},
            {"from": "human", "value": f"Spell the word '{word}' backwards."},
            {"from": "gpt", "value": f"'{word}' backwards is '{word[::-1]}'."},
        ])
    advice = [
        ("How can I start learning a new language?", "Begin with the most common words and practise a little every day.",
         "How long should I practise each day?", "Even fifteen minutes a day works, as long as you do it daily."),
        ("My houseplant's leaves are turning yellow. Why?", "Most often it is too much water; let the soil dry a little between waterings.",
         "How do I know when it is dry enough?", "Push a finger into the soil: if the top two centimeters are dry, water it."),
        ("What is a good way to plan a week?", "List your fixed appointments first, then place your most important tasks in the free blocks.",
         "And if something urgent comes up?", "Move one lower-priority task to next week instead of squeezing everything in."),
        ("How do I make a simple vinaigrette?", "Whisk three parts oil with one part vinegar, then add salt and pepper.",
         "Can I use lemon juice instead of vinegar?", "Yes, lemon juice works well and gives a fresher taste."),
        ("How can I fall asleep more easily?", "Keep a regular bedtime and put screens away half an hour before sleeping.",
         "What if I still lie awake?", "Get up, do something calm in dim light, and go back to bed when you feel sleepy."),
        ("Why do we see lightning before we hear thunder?", "Light travels much faster than sound, so the flash reaches you first.",
         "Can I tell how far away the storm is?", "Count the seconds between flash and thunder and divide by three to get kilometers."),
    ]
    for q1, a1, q2, a2 in advice:
        conversations.append([{"from": "human", "value": q1}, {"from": "gpt", "value": a1},
                              {"from": "human", "value": q2}, {"from": "gpt", "value": a2}])
    rng.shuffle(conversations)
    return [{"id": f"conv-{index:03d}", "conversations": turns} for index, turns in enumerate(conversations)]


QUOTE_TEXTS = [
    "A lantern does not argue with the dark; it simply keeps burning.",
    "The river never asks the stone for permission, and still it reaches the sea.",
    "A map is only a promise that someone once walked there.",
    "The quietest bell in the tower is the one everybody listens for.",
    "Seeds do not apologise for the soil they were given.",
    "An old key remembers every door it has opened.",
    "The tide keeps no diary, yet it never forgets to return.",
    "Borrowed courage still carries you across the bridge.",
    "The last page of a notebook is where the best ideas wait.",
    "Patience is courage that has learned to sit down.",
    "A kite rises against the wind, not with it.",
    "Every workshop smells of mistakes that became tools.",
    "You cannot hurry a teapot, and you should not hurry a friend.",
    "The compass points north; the heart decides whether to follow.",
    "Small boats learn the sea faster than big ones.",
    "A garden is a conversation you have with next year.",
    "Kindness is the only luggage that gets lighter the more you carry it.",
    "The moon does not compete with the streetlights.",
    "Half of every journey is deciding to leave the porch.",
    "An unfinished bridge still teaches you where the river is.",
    "The loudest thunder is only the echo of the lightning.",
    "If you write the question down, it is already smaller.",
    "Snow falls one flake at a time and still covers the mountain.",
    "The best ladders are built from the stairs you tripped on.",
    "A good story leaves the door open behind it.",
    "Footprints in the sand are the sea's way of taking notes.",
    "Clocks measure time; friends measure whether it was worth it.",
    "The smallest window still lets in the whole sky.",
    "Rust is only iron that stayed in one place too long.",
    "Nobody remembers the weather on the day they were brave.",
    "A closed book is a sleeping argument.",
    "Harbors are built for storms, not for calm days.",
    "The fox learns more from one trap than from a hundred meals.",
    "Carry your questions like lanterns, not like stones.",
    "A well-kept secret is a garden nobody else can visit.",
    "Even the slowest ferry arrives if it keeps its engine running.",
    "Mirrors show your face; mistakes show your shape.",
    "A chorus forgives the singer who forgets a line.",
    "The orchard does not bloom because it is watched.",
    "Every map has an edge, and every edge is an invitation.",
    "Courage is just fear that decided to finish the sentence.",
    "The observatory is dark so that the stars can be bright.",
    "A single candle can light a thousand more and lose nothing.",
    "The road does not care how fast you walk, only that you keep walking.",
    "Tea tastes better when someone else pours it.",
    "A carousel goes nowhere and still makes children laugh.",
    "The wise traveller packs one question more than answers.",
    "Winter is the season when trees practise patience.",
    "An apology is a bridge you build from your own side first.",
    "Lighthouses do not chase ships; they stand where they are needed.",
]


def make_quotes() -> list[dict]:
    """About 50 invented quotes as {"text": ...} rows (for the plain-text synthesizer)."""
    return [{"text": text} for text in QUOTE_TEXTS]


# ---- writing the files

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_samples(out_dir: Path = SAMPLE_DIR, seed: int = SEED) -> list[Path]:
    """Write every sample file into out_dir and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog = make_catalog(300, seed, complete_rows=40, synopsis_words=(40, 120), complete_synopsis_words=(40, 60))
    paths = [out_dir / name for name in ("anime_catalog.csv", "instructions.jsonl", "conversations.json", "quotes.jsonl")]
    catalog.to_csv(paths[0], index=False, encoding="utf-8", lineterminator="\n")
    write_jsonl(paths[1], make_instructions(seed))
    paths[2].write_text(json.dumps(make_conversations(seed), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_jsonl(paths[3], make_quotes())
    return paths


def write_catalog(out_dir: Path, rows: int, seed: int = SEED) -> Path:
    """Write out_dir/anime_catalog.csv: `rows` titles, every field anime_qa asks about filled, short synopses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "anime_catalog.csv"
    catalog = make_catalog(rows, seed, complete_rows=rows, complete_synopsis_words=(40, 60))
    catalog.to_csv(path, index=False, encoding="utf-8", lineterminator="\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (default: data/sample)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--catalog", type=int, default=None, metavar="ROWS",
                        help="write only anime_catalog.csv with ROWS complete titles (configs/gpu_8b.yaml: 5000)")
    args = parser.parse_args()
    if args.catalog is not None:
        print(f"wrote {write_catalog(args.out, args.catalog, args.seed)}")
        return
    for path in write_samples(args.out, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
