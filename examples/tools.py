"""Example tools for `nesso-mlx chat --model nesso-agentic --tools examples/tools.py`.

Every public function here becomes a tool: its type hints and docstring are its schema.
The weather is fake data, so the example works offline.
"""

from __future__ import annotations

import ast
import operator
from typing import Literal

_FAKE_WEATHER = {
    "roma": ("sereno", 24),
    "milano": ("nuvoloso", 17),
    "napoli": ("soleggiato", 26),
    "torino": ("pioggia", 14),
    "london": ("rain", 12),
    "paris": ("cloudy", 16),
}


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather for a city.

    Args:
        city: City name, e.g. "Roma".
        unit: Temperature unit.
    """
    condition, celsius = _FAKE_WEATHER.get(city.strip().lower(), ("variabile", 20))
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "condition": condition, "temperature": temperature, "unit": unit}


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> float:
    """Evaluate an arithmetic expression with + - * / ** % and parentheses.

    Args:
        expression: For example "(12.5 + 7) * 3".
    """

    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.operand))
        raise ValueError(f"unsupported expression: {ast.unparse(node)}")

    return evaluate(ast.parse(expression, mode="eval").body)


_TO_METRES = {"m": 1.0, "km": 1000.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048, "in": 0.0254}
_TO_KG = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a length (m, km, cm, mi, ft, in), a mass (kg, g, lb, oz) or a temperature (C, F).

    Args:
        value: The amount to convert.
        from_unit: Unit of the value.
        to_unit: Unit wanted.
    """
    if {from_unit, to_unit} <= {"C", "F"}:
        result = value if from_unit == to_unit else (value * 9 / 5 + 32 if from_unit == "C" else (value - 32) * 5 / 9)
    else:
        for table in (_TO_METRES, _TO_KG):
            if from_unit in table and to_unit in table:
                result = value * table[from_unit] / table[to_unit]
                break
        else:
            raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    return {"value": round(result, 6), "unit": to_unit}
