"""Data the package ships: the worked-example pool FoT retrieves from for math input augmentation, and the words
that made-up word problems draw on (the adapter's training prompts and the search workload's)."""

NAMES = ["Tom", "Ana", "Ravi", "Mia", "Omar", "Lena", "Kofi", "Yuki", "Sara", "Ben"]
THINGS = ["apples", "books", "marbles", "pencils", "cookies", "stamps", "shells", "cards", "coins", "eggs"]
