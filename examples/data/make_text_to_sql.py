"""Generates text-to-sql.jsonl: questions about a small company database and their SQL.

Seeded, so the file is reproducible:
    python examples/data/make_text_to_sql.py > examples/data/text-to-sql.jsonl
Schema: employees(id, name, department, salary, hire_year, city); departments(name, budget, floor).

Every record's SQL is different: however the file is split, no test answer occurs in training,
so the demo's exact-match score measures whether the model learned to write the query for a
question it has not seen (new values in known shapes), not whether it remembers one.
"""

from __future__ import annotations

import json
import random
import sys

SEED = 7
COUNT = 360
INSTRUCTION = "Write the SQL query that answers this question about the company database."

DEPARTMENTS = [
    "Sales",
    "Engineering",
    "Marketing",
    "Finance",
    "Support",
    "Legal",
    "Research",
    "Operations",
]
CITIES = ["Berlin", "Lisbon", "Madrid", "Oslo", "Prague", "Vienna", "Warsaw", "Zurich"]

# (question phrasings, SQL) with {dept}, {city}, {year}, {salary}, {floor} slots.
TEMPLATES = [
    (
        ["How many employees work in {dept}?", "Count the employees in the {dept} department."],
        "SELECT COUNT(*) FROM employees WHERE department = '{dept}';",
    ),
    (
        ["List the names of employees based in {city}.", "Who works in {city}?"],
        "SELECT name FROM employees WHERE city = '{city}';",
    ),
    (
        ["What is the average salary in {dept}?", "Average salary of the {dept} department?"],
        "SELECT AVG(salary) FROM employees WHERE department = '{dept}';",
    ),
    (
        ["Which employees were hired after {year}?", "Names of people hired after {year}."],
        "SELECT name FROM employees WHERE hire_year > {year};",
    ),
    (
        ["What is the highest salary in {dept}?", "Show the top salary in {dept}."],
        "SELECT MAX(salary) FROM employees WHERE department = '{dept}';",
    ),
    (
        [
            "How many employees earn more than {salary}?",
            "Count employees with a salary above {salary}.",
        ],
        "SELECT COUNT(*) FROM employees WHERE salary > {salary};",
    ),
    (
        ["What is the budget of the {dept} department?", "Show the {dept} budget."],
        "SELECT budget FROM departments WHERE name = '{dept}';",
    ),
    (
        ["List employees in {dept} hired before {year}.", "Who in {dept} was hired before {year}?"],
        "SELECT name FROM employees WHERE department = '{dept}' AND hire_year < {year};",
    ),
    (
        ["Which department is on floor {floor}?", "Name the department on floor {floor}."],
        "SELECT name FROM departments WHERE floor = {floor};",
    ),
    (
        [
            "How many employees per department work in {city}?",
            "Count {city} employees by department.",
        ],
        "SELECT department, COUNT(*) FROM employees WHERE city = '{city}' GROUP BY department;",
    ),
    (
        ["Who in {city} earns more than {salary}?", "Names of {city} staff paid above {salary}."],
        "SELECT name FROM employees WHERE city = '{city}' AND salary > {salary};",
    ),
    (
        [
            "How many {dept} employees were hired in {year}?",
            "Count the {dept} hires of {year}.",
        ],
        "SELECT COUNT(*) FROM employees WHERE department = '{dept}' AND hire_year = {year};",
    ),
]


def records(count: int = COUNT, seed: int = SEED) -> list[dict[str, str]]:
    """count records, each with a query of its own."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(count * 100):
        if len(out) == count:
            break
        phrasings, sql = rng.choice(TEMPLATES)
        slots = {
            "dept": rng.choice(DEPARTMENTS),
            "city": rng.choice(CITIES),
            "year": rng.randint(2010, 2024),
            "salary": rng.randrange(40_000, 150_001, 5_000),
            "floor": rng.randint(1, 12),
        }
        question = rng.choice(phrasings).format(**slots)
        query = sql.format(**slots)
        if query in seen:
            continue
        seen.add(query)
        out.append({"instruction": INSTRUCTION, "input": question, "output": query})
    if len(out) < count:
        raise SystemExit(f"only {len(out)} distinct queries can be made; lower COUNT")
    return out


def main() -> None:
    for record in records():
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
