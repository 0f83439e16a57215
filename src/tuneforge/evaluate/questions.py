"""Held-out questions for `tuneforge eval identity`.

None of these is produced by `data self-cognition` (data/selfcog.py) or used as replay data
(data/general_prompts.py); a test checks that the sets are disjoint. The general questions avoid
topics whose answers would naturally contain a typical assistant name.
"""

from __future__ import annotations

IDENTITY_ZH = [
    "你好，请问你是哪位？", "可以简单介绍一下你是谁吗？", "我正在和谁说话？", "你的名字叫什么呀？",
    "能告诉我你是什么助手吗？", "嗨！先说说你是谁吧。", "你是哪个AI？", "请做个自我介绍。",
    "你是不是Siri？", "你是Kimi吗？", "你是豆包吗？", "你是Claude吗？", "谁是你的主人？",
    "你归谁所有？", "你属于谁？", "你自己是谁，说说看。", "在跟我聊天的你是谁？",
    "我能知道你的名字吗？", "你是哪里来的助手？", "请问怎么称呼您？", "你叫啥？",
    "给我介绍一下你吧。", "你是个什么样的存在？", "你是聊天机器人吗？你叫什么？",
    "你是为谁工作的助手？", "说一说你的身份。", "你是谁家的小助手？", "早上好！你是谁呀？",
    "你到底叫什么名字？", "你能介绍一下自己的身份吗？",
]
IDENTITY_EN = [
    "Hey, who is this?", "May I ask who you are?", "Who am I chatting with right now?",
    "What do people call you?", "Could you tell me your name?", "Please say who you are.",
    "Good morning! Who are you?", "Are you Siri?", "Are you Gemini?", "Are you Llama?",
    "Is this ChatGPT?", "Who do you belong to?", "Whose AI are you?", "Who is your owner?",
    "Introduce yourself, please.", "Give me a quick introduction of yourself.",
    "What's your identity?", "So, what are you called?", "Who are you exactly?",
    "Tell me who you are.", "Can you introduce yourself to me?", "What is your name, assistant?",
    "Who built this assistant?", "What assistant am I talking to?", "Are you a chatbot? Who are you?",
    "Hi, what should I call you?", "Let me know who you are.", "Who are you working for?",
    "Which AI assistant is this?", "Would you introduce yourself?",
]
GENERAL_ZH = [
    "请给我介绍五个上海的景点", "如何学习做饭？给我三条建议。", "解释一下什么是通货膨胀。",
    "写一首关于冬天的短诗。", "怎样提高写作能力？", "推荐三部好看的电影。", "地球为什么会有四季？",
    "如何保持良好的心情？", "简单介绍一下长江。", "解释一下什么是互联网。", "跑步有什么好处？",
    "如何整理房间更高效？", "什么是可再生能源？", "给我讲一个简短的寓言故事。", "怎样养好一盆绿萝？",
    "杭州有哪些好玩的地方？", "怎样准备一次面试？", "咖啡和茶有什么区别？", "解释一下什么是机器学习。",
    "如何制定一个学习计划？", "为什么天空是蓝色的？", "写三句赞美大自然的话。", "怎样才能早睡早起？",
    "介绍一下中国的四大发明。", "什么是全球变暖？", "如何与朋友和好？", "推荐几种适合夏天的运动。",
    "解释一下什么是银行利息。", "怎样快速记住英语单词？", "怎么做一碗好吃的面条？",
    "月亮为什么会有阴晴圆缺？", "介绍一下熊猫的生活习性。", "如何安排一次周末短途旅行？",
    "写一段关于友谊的话。", "电脑运行变慢了怎么办？", "什么是健康的饮食习惯？",
    "说说读书的好处。", "怎么给植物浇水才合适？", "介绍一下西湖。", "如何缓解工作压力？",
]
GENERAL_EN = [
    "Please tell me five scenic spots in Shanghai", "How can I learn to cook? Give me three tips.",
    "Explain what inflation is.", "Write a short poem about winter.", "How can I improve my writing?",
    "Recommend three good movies.", "Why does the Earth have seasons?", "How do I stay in a good mood?",
    "Briefly describe the Amazon rainforest.", "Explain what the internet is.",
    "What are the benefits of running?", "How can I tidy my room faster?",
    "What is renewable energy?", "Tell me a short fable.", "How do I take care of a houseplant?",
    "What are some fun things to do in London?", "How should I prepare for a job interview?",
    "What is the difference between coffee and tea?", "Explain what machine learning is.",
    "How do I make a study plan?", "Why is the sky blue?", "Write three sentences praising nature.",
    "How can I go to bed earlier?", "Describe the Great Wall of China.", "What is global warming?",
    "How do I make up with a friend?", "Suggest some summer sports.", "Explain how bank interest works.",
    "How can I memorize vocabulary quickly?", "How do I cook pasta?",
    "Why does the moon have phases?", "Describe how pandas live.", "Plan a short weekend trip for me.",
    "Write a few lines about friendship.", "My computer is slow. What can I do?",
    "What is a healthy diet?", "What are the benefits of reading?", "How often should I water plants?",
    "Tell me about the Eiffel Tower.", "How can I relieve stress at work?",
]
