#!/usr/bin/env python3
"""Writes the small chat dataset of README's instruction-tuning example (docs/examples/austen_chat_*.jsonl).

The conversations teach one answer format about Jane Austen's characters: "NAME appears in NOVEL
(YEAR). DESCRIPTION" followed by a fixed sign-off, so the effect of a short fine-tune is easy to see in
`qlora generate` and in eval loss. Facts were written for this project from the novels (public domain).
Run: python3 scripts/make_austen_chat.py   (standard library only; deterministic)
"""
import json
import random
from pathlib import Path

NOVELS = {
    "Pride and Prejudice": 1813, "Sense and Sensibility": 1811, "Emma": 1815,
    "Persuasion": 1817, "Mansfield Park": 1814, "Northanger Abbey": 1817,
}

CHARACTERS = [
    ("Elizabeth Bennet", "Pride and Prejudice", "the quick-witted second daughter of the Bennets of Longbourn"),
    ("Fitzwilliam Darcy", "Pride and Prejudice", "the proud and wealthy master of Pemberley in Derbyshire"),
    ("Jane Bennet", "Pride and Prejudice", "the gentle eldest Bennet sister, who thinks well of everyone"),
    ("Charles Bingley", "Pride and Prejudice", "the amiable young man who rents Netherfield Park"),
    ("Mr. Collins", "Pride and Prejudice", "the pompous clergyman who will inherit Longbourn"),
    ("Lydia Bennet", "Pride and Prejudice", "the youngest Bennet sister, who elopes with Wickham"),
    ("George Wickham", "Pride and Prejudice", "a charming officer with a dishonest past"),
    ("Lady Catherine de Bourgh", "Pride and Prejudice", "Darcy's domineering aunt at Rosings Park"),
    ("Elinor Dashwood", "Sense and Sensibility", "the sensible eldest Dashwood sister, who hides her feelings"),
    ("Marianne Dashwood", "Sense and Sensibility", "Elinor's romantic sister, who feels everything openly"),
    ("Colonel Brandon", "Sense and Sensibility", "a quiet, honourable friend of the Dashwoods"),
    ("John Willoughby", "Sense and Sensibility", "the dashing young man who wins and wounds Marianne"),
    ("Edward Ferrars", "Sense and Sensibility", "a shy man bound by an old engagement to Lucy Steele"),
    ("Emma Woodhouse", "Emma", "a clever, rich young woman of Hartfield who loves matchmaking"),
    ("George Knightley", "Emma", "Emma's frank neighbour and friend, master of Donwell Abbey"),
    ("Harriet Smith", "Emma", "a sweet young friend whose matches Emma tries to arrange"),
    ("Miss Bates", "Emma", "a kind, talkative spinster of Highbury"),
    ("Frank Churchill", "Emma", "a charming young man with a secret engagement"),
    ("Anne Elliot", "Persuasion", "a thoughtful woman persuaded years ago to refuse the man she loved"),
    ("Frederick Wentworth", "Persuasion", "a naval captain who returns rich from the war"),
    ("Sir Walter Elliot", "Persuasion", "Anne's vain father, who must let Kellynch Hall"),
    ("Fanny Price", "Mansfield Park", "a modest girl raised by her wealthy relations at Mansfield"),
    ("Edmund Bertram", "Mansfield Park", "Fanny's kind cousin, who means to become a clergyman"),
    ("Mary Crawford", "Mansfield Park", "a lively, worldly young woman from London"),
    ("Henry Crawford", "Mansfield Park", "Mary's brother, a charming flirt who courts Fanny"),
    ("Catherine Morland", "Northanger Abbey", "a young reader of gothic novels on her first visit to Bath"),
    ("Henry Tilney", "Northanger Abbey", "a witty clergyman who teases Catherine kindly"),
    ("General Tilney", "Northanger Abbey", "Henry's stern, money-minded father"),
    ("Isabella Thorpe", "Northanger Abbey", "Catherine's flattering and fickle friend in Bath"),
]

QUESTIONS = [
    "Who is {name}?", "Tell me about {name}.", "Which novel is {name} from?",
    "In which book would I meet {name}?", "Can you describe {name} for me?",
    "I keep hearing about {name}. Who is that?", "What should I know about {name}?",
    "Quick question: who was {name}?",
]
HELD_OUT_QUESTIONS = ["Remind me who {name} is.", "Where does {name} appear, and who are they?"]
SYSTEMS = ["You are a helpful librarian.", "Answer briefly.", None, None]
SIGN_OFF = "Happy reading!"


def answer(name, novel, description):
    return f"{name} appears in {novel} ({NOVELS[novel]}): {description}. {SIGN_OFF}"


def conversation(rng, character, template):
    name, novel, description = character
    messages = []
    system = rng.choice(SYSTEMS)
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": template.format(name=name)})
    messages.append({"role": "assistant", "content": answer(name, novel, description)})
    if rng.random() < 0.25:  # a second turn about another character
        other = rng.choice(CHARACTERS)
        messages.append({"role": "user", "content": f"And {other[0]}?"})
        messages.append({"role": "assistant", "content": answer(*other)})
    return {"messages": messages}


def main():
    rng = random.Random(1813)
    out = Path(__file__).resolve().parent.parent / "docs" / "examples"
    out.mkdir(parents=True, exist_ok=True)
    train = [conversation(rng, c, q) for c in CHARACTERS for q in QUESTIONS]
    rng.shuffle(train)
    held_out = [conversation(rng, c, q) for c in CHARACTERS for q in HELD_OUT_QUESTIONS]
    for name, rows in (("austen_chat_train.jsonl", train), ("austen_chat_eval.jsonl", held_out)):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{out / name}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
