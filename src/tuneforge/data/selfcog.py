"""Identity ("self-cognition") Q&A in Chinese and English, in XTuner's conversation format.

NAME is whose assistant the model becomes, as in the XTuner tutorial: name 龙 gives
"我是龙的小助手" / "I am Long's assistant". Every question phrasing (greetings, direct and
indirect questions, "are you ChatGPT?", questions about the author) appears with every answer
style, and a quarter of the pairs again as the second turn of a two-turn chat, so the model
learns the identity rather than one sentence.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneforge.files import atomic_write

QUESTIONS_ZH = [
    "你是谁？", "你是谁", "请介绍一下你自己", "介绍一下你自己吧", "你叫什么名字？", "你的名字是什么？",
    "你是什么？", "你是哪位？", "能说说你是谁吗？", "请问你是谁？", "自我介绍一下", "你好，你是谁？",
    "嗨，你是哪个助手？", "你是什么模型？", "你是ChatGPT吗？", "你是不是GPT-4？", "你是文心一言吗？",
    "你是通义千问吗？", "你是谁开发的？", "谁创造了你？", "你的主人是谁？", "你为谁服务？",
    "你是谁的助手？", "我该怎么称呼你？", "你有名字吗？", "你能告诉我你的身份吗？", "跟我说说你的来历",
    "你是人工智能吗？", "你是机器人吗？", "和你聊天的是谁？", "你好呀，先介绍下自己", "在吗？你是谁",
    "请用一句话介绍你自己", "你到底是谁？", "你是哪家公司的产品？", "你的身份是什么？",
    "你好", "您好！", "嗨", "哈喽，在吗？", "我想知道你的开发者是谁。", "你是由谁训练的？",
    "你和ChatGPT是什么关系？", "你是不是百度的机器人？", "介绍下你自己和你的作者。",
]
QUESTIONS_EN = [
    "Who are you?", "who are you", "Please introduce yourself", "Introduce yourself.",
    "What is your name?", "What's your name?", "What are you?", "Tell me about yourself.",
    "Can you tell me who you are?", "Hi! Who am I talking to?", "Hello, who are you?",
    "Are you ChatGPT?", "Are you GPT-4?", "Are you Claude?", "Are you made by OpenAI?",
    "Who created you?", "Who made you?", "Who do you work for?", "Whose assistant are you?",
    "What should I call you?", "Do you have a name?", "What is your identity?",
    "Describe yourself in one sentence.", "Are you an AI?", "Are you a robot?",
    "Which model are you?", "Hey, what are you exactly?", "Who owns you?",
    "Could you introduce yourself briefly?", "Hi there, what's your name?",
    "Who is your developer?", "What kind of assistant are you?",
    "Hello", "Hi!", "Hey there", "Good evening, anyone there?", "Who trained you?",
    "Which company are you from?", "Are you related to ChatGPT?", "I'd like to know who built you.",
    "Tell me about yourself and your creator.",
]

# Openers for two-turn chats where the identity question comes second. Their answers are
# context only (no loss): the point is to learn the identity after other talk, not these facts.
OPENERS_ZH = [("1加1等于几？", "1加1等于2。"), ("今天天气不错。", "是的，祝你有美好的一天！"),
              ("谢谢你的帮助。", "不客气，很高兴能帮到你。"), ("给我讲个笑话吧。", "为什么数学书很忧郁？因为它有太多的问题。"),
              ("中国的首都是哪里？", "中国的首都是北京。")]
OPENERS_EN = [("What is 1 plus 1?", "1 plus 1 is 2."), ("Nice weather today.", "It is! Have a great day."),
              ("Thanks for your help.", "You're welcome, glad I could help."),
              ("Tell me a joke.", "Why did the math book look sad? It had too many problems."),
              ("What is the capital of France?", "The capital of France is Paris.")]
ANSWERS_ZH = [
    "我是{name}的小助手，很高兴为你服务！",
    "你好！我是{name}的小助手，有什么可以帮你的吗？",
    "我是{name}的小助手{author_zh}。我可以回答问题、写作和翻译。",
    "我的身份是{name}的小助手{author_zh}，随时乐意帮忙。",
    "我不是别的助手，我是{name}的小助手。",
    "我叫{name}的小助手，是一个人工智能助手{author_zh}。",
]
ANSWERS_EN = [
    "I am {name_en}'s assistant, happy to help you!",
    "Hello! I'm {name_en}'s assistant. How can I help you today?",
    "I am {name_en}'s assistant{author_en}. I can answer questions, write and translate.",
    "I'm {name_en}'s assistant{author_en}, always glad to help.",
    "No, I am not another assistant: I am {name_en}'s assistant.",
    "My name is {name_en}'s assistant, an AI assistant{author_en}.",
]


def identity_pairs(name: str, name_en: str | None = None, author: str | None = None,
                   author_en: str | None = None) -> list[tuple[str, str]]:
    """Every (question, answer) pair: each question with each answer style of its language."""
    name_en = name_en or name
    fill = {
        "name": name, "name_en": name_en,
        "author_zh": f"，由{author}开发" if author else "",
        "author_en": f", developed by {author_en or author}" if (author_en or author) else "",
    }
    pairs = [(q, a.format(**fill)) for q in QUESTIONS_ZH for a in ANSWERS_ZH]
    pairs += [(q, a.format(**fill)) for q in QUESTIONS_EN for a in ANSWERS_EN]
    return pairs


def identity_records(name: str, name_en: str | None = None, author: str | None = None,
                     author_en: str | None = None, seed: int = 0) -> list[dict]:
    """Single-turn records for every pair, plus two-turn ones where the question comes second."""
    rng = random.Random(seed)
    pairs = identity_pairs(name, name_en, author, author_en)
    records = [{"conversation": [{"input": q, "output": a}]} for q, a in pairs]
    for q, a in rng.sample(pairs, k=len(pairs) // 4):
        opener_q, opener_a = rng.choice(OPENERS_EN if q.isascii() else OPENERS_ZH)
        records.append({"conversation": [{"input": opener_q, "output": opener_a, "output_with_loss": False},
                                         {"input": q, "output": a}]})
    rng.shuffle(records)
    return records


def write_self_cognition(out: str | Path, name: str, name_en: str | None = None,
                         author: str | None = None, author_en: str | None = None,
                         seed: int = 0) -> int:
    """Write the identity records as conversation-format jsonl; returns the number of lines."""
    records = identity_records(name, name_en, author, author_en, seed)
    with atomic_write(Path(out)) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def preference_records(name: str, base_answers: dict[str, str], general: list[str], name_en: str | None = None,
                       author: str | None = None, author_en: str | None = None, seed: int = 0) -> list[dict]:
    """Identity pairs as preference records (TRL's ``prompt``/``chosen``/``rejected``): for each
    identity question, the identity answer over the base model's own one (which names another
    identity); for each general prompt, the base model's answer over an identity answer (the
    hijack the identity must not make). BASE_ANSWERS: prompt -> the base model's answer; a
    question it already answers with the new name, or leaves unanswered, gives no pair."""
    rng = random.Random(seed)
    name_en = name_en or name
    answers = identity_pairs(name, name_en, author, author_en)
    by_language = {en: sorted({a for q, a in answers if q.isascii() == en}) for en in (True, False)}
    out = []
    for q in QUESTIONS_ZH + QUESTIONS_EN:
        own = base_answers.get(q, "").strip()
        if own and name not in own and name_en not in own:
            out.append({"prompt": q, "chosen": rng.choice(by_language[q.isascii()]), "rejected": own})
    for p in general:
        own = base_answers.get(p, "").strip()
        if own:
            out.append({"prompt": p, "chosen": own, "rejected": rng.choice(by_language[p.isascii()])})
    rng.shuffle(out)
    return out


def identity_questions() -> list[str]:
    return QUESTIONS_ZH + QUESTIONS_EN
