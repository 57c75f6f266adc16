"""The few-shot exemplars of the evaluation protocols (:mod:`posttrain.evaluation.protocols`), as public text.

None of them comes from a test split; each is kept character for character as the published harness uses it,
so a prompt built from them is the prompt the published numbers were measured with.

- ``GSM8K_8SHOT_COT``: the eight chain-of-thought exemplars for math word problems of Wei et al. 2022,
  "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models" (arXiv 2201.11903), written by the
  authors (not GSM8K problems). Text as in DeepSeek-Math ``evaluation/few_shot_prompts/cot_gsm_8_shot.py``
  (github.com/deepseek-ai/DeepSeek-Math, commit b8b0f8c), the harness of DeepSeekMath-Base's 64.2; the same
  eight as lm-evaluation-harness ``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``.
- ``MINERVA_MATH_4SHOT``: the four-shot MATH prompt of Lewkowycz et al. 2022, "Solving Quantitative Reasoning
  Problems with Language Models" (Minerva, arXiv 2206.14858). Text as in DeepSeek-Math
  ``evaluation/few_shot_prompts/cot_minerva_math_4_shot.py`` (same commit), the harness of DeepSeekMath-Base's
  MATH 36.2; lm-evaluation-harness ``lm_eval/tasks/minerva_math/utils.py`` (``list_fewshot_samples``) has the
  same four with the solutions' sentences on one line. The stray ``}`` after the first problem is in the
  original prompt and is kept.
- ``GSM8K_TRAIN_FIRST_5``: the first five rows of the GSM8K *train* split (github.com/openai/grade-school-math,
  ``grade_school_math/data/train.jsonl``, commit 3101c7d; MIT), answers with their ``<<...>>`` calculator
  annotations and ``#### N`` line as the dataset writes them. lighteval's ``gsm8k`` task (SmolLM2's model card
  figures) draws five random train rows per problem; a fixed five keeps our prompt reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shot:
    """One worked example: the question and the answer text exactly as the prompt shows them."""

    question: str
    answer: str


GSM8K_8SHOT_COT = (
    Shot(question=('There are 15 trees in the grove. Grove workers will plant trees in the grove today. After '
                   'they are done, there will be 21 trees. How many trees did the grove workers plant today?'),
         answer=('There are 15 trees originally. Then there were 21 trees after some more were planted. So '
                 'there must have been 21 - 15 = 6. The answer is 6.')),
    Shot(question=('If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the '
                   'parking lot?'),
         answer=('There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.')),
    Shot(question=('Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have '
                   'left in total?'),
         answer=('Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. '
                 'After eating 35, they had 74 - 35 = 39. The answer is 39.')),
    Shot(question=('Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many '
                   'lollipops did Jason give to Denny?'),
         answer=('Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny '
                 '20 - 12 = 8. The answer is 8.')),
    Shot(question=('Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many '
                   'toys does he have now?'),
         answer=('Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more '
                 'toys. 5 + 4 = 9. The answer is 9.')),
    Shot(question=('There were nine computers in the server room. Five more computers were installed each day, '
                   'from monday to thursday. How many computers are now in the server room?'),
         answer=('There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 '
                 '= 20 computers were added. 9 + 20 is 29. The answer is 29.')),
    Shot(question=('Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 '
                   'more. How many golf balls did he have at the end of wednesday?'),
         answer=('Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After '
                 'losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.')),
    Shot(question=('Olivia has $23. She bought five bagels for $3 each. How much money does she have left?'),
         answer=('Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 '
                 '- 15 dollars left. 23 - 15 is 8. The answer is 8.')),
)

MINERVA_MATH_4SHOT = (
    Shot(question=('Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}'),
         answer=('The expressions inside each square root must be non-negative.\nTherefore, $x-2 \\ge 0$, so '
                 '$x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$.\nAlso, the denominator cannot be equal to zero, '
                 'so $5-x>0$, which gives $x<5$.\nTherefore, the domain of the expression is '
                 '$\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.')),
    Shot(question=('If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} '
                   '\\mathbf{B}).$'),
         answer=('We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = '
                 '(2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.')),
    Shot(question=('Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights '
                   'instead, how many times must Terrell lift them in order to lift the same total weight?'),
         answer=('If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ '
                 'pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a '
                 'total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can '
                 'solve for $n$: \\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n'
                 '\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.')),
    Shot(question=('If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has '
                   'a solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ '
                   'is nonzero.'),
         answer=('If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n'
                 '$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n'
                 '$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The '
                 'final answer is $-\\frac{2}{3}$. I hope it is correct.')),
)

GSM8K_TRAIN_FIRST_5 = (
    Shot(question=('Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in '
                   'May. How many clips did Natalia sell altogether in April and May?'),
         answer=('Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips '
                 'altogether in April and May.\n#### 72')),
    Shot(question=('Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. '
                   'How much did she earn?'),
         answer=('Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = '
                 '$<<0.2*50=10>>10.\n#### 10')),
    Shot(question=('Betty is saving money for a new wallet which costs $100. Betty has only half of the money '
                   'she needs. Her parents decided to give her $15 for that purpose, and her grandparents '
                   'twice as much as her parents. How much more money does Betty need to buy the wallet?'),
         answer=("In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her "
                 '15 * 2 = $<<15*2=30>>30.\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 '
                 'more.\n#### 5')),
    Shot(question=('Julie is reading a 120-page book. Yesterday, she was able to read 12 pages and today, she '
                   'read twice as many pages as yesterday. If she wants to read half of the remaining pages '
                   'tomorrow, how many pages should she read?'),
         answer=('Maila read 12 x 2 = <<12*2=24>>24 pages today.\nSo she was able to read a total of 12 + 24 = '
                 '<<12+24=36>>36 pages since yesterday.\nThere are 120 - 36 = <<120-36=84>>84 pages left to be '
                 'read.\nSince she wants to read half of the remaining pages tomorrow, then she should read '
                 '84/2 = <<84/2=42>>42 pages.\n#### 42')),
    Shot(question=('James writes a 3-page letter to 2 different friends twice a week.  How many pages does he '
                   'write a year?'),
         answer=('He writes each friend 3*2=<<3*2=6>>6 pages a week\nSo he writes 6*2=<<6*2=12>>12 pages every '
                 'week\nThat means he writes 12*52=<<12*52=624>>624 pages a year\n#### 624')),
)
