"""The built-in general-ability suite: short prompts with one right answer, asked of the base and the fine-tuned model.

Arithmetic, capitals, units, colours, short instructions and a few two-step questions. Expected answers use '|'
between alternatives and are judged strictly (loraflow.evaluation.metrics.general_answer_ok). None of these is a
prompt of the demo's replay data (data/sample/general_replay.jsonl; a test keeps the two apart), so the suite
measures general ability, not what replay trained.
"""

GENERAL_SUITE: dict[str, str] = {
    # arithmetic
    "What is 3 + 5?": "8|eight",
    "What is 9 minus 4?": "5|five",
    "What is 6 times 7?": "42",
    "What is 12 divided by 3?": "4|four",
    "What is 7 times 8?": "56",
    "What is 15 + 27?": "42",
    "What is 100 minus 1?": "99",
    "What is half of 10?": "5|five",
    # capitals
    "What is the capital of Italy?": "Rome",
    "What is the capital of Germany?": "Berlin",
    "What is the capital of Spain?": "Madrid",
    "What is the capital of the United Kingdom?": "London",
    "What is the capital of Egypt?": "Cairo",
    "What is the capital of Russia?": "Moscow",
    "What is the capital of China?": "Beijing",
    "What is the capital of Canada?": "Ottawa",
    # units and counting
    "How many minutes are in an hour?": "60|sixty",
    "How many centimeters are in a meter?": "100",
    "How many grams are in a kilogram?": "1000",
    "How many seconds are in a minute?": "60|sixty",
    "How many months are in a year?": "12|twelve",
    "How many days are in a leap year?": "366",
    "How many meters are in a kilometer?": "1000",
    "How many legs does a dog have?": "4|four",
    # colours
    "What color is grass?": "green",
    "What color is snow?": "white",
    "What color is a ripe banana?": "yellow",
    "What color do you get by mixing blue and yellow?": "green",
    "What color is coal?": "black",
    "What color is a ripe tomato?": "red",
    # short instructions
    "Reply with only the word yes.": "yes",
    "Spell the word cat backwards.": "tac",
    "Translate 'hello' into Spanish.": "hola",
    "What is the plural of mouse?": "mice",
    "What is the opposite of up?": "down",
    "Which day comes after Monday?": "Tuesday",
    # general knowledge
    "What is the largest ocean on Earth?": "Pacific",
    "What planet do we live on?": "Earth",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the freezing point of water in Celsius?": "0|zero",
    # two steps
    "If I have 3 apples and buy 2 more, how many apples do I have?": "5|five",
    "Tom has 10 candies and gives away 4. How many candies does he have left?": "6|six",
    "What is 2 + 3 + 4?": "9|nine",
    "What is double 6?": "12|twelve",
}
