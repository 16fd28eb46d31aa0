"""Generate the bundled Vietnamese customer-service chats from templates with a seeded RNG.

Run from the repository root to rewrite both files next to this script:

    python models/data/build_dataset.py

The output is deterministic (fixed seed, fixed template order), so re-running it on an unchanged
script leaves `support_chats.jsonl` and `demo_prompts.jsonl` byte-identical; the demo student's
cache key hashes the JSONL bytes, not this script.

Questions vary (phrasings, greetings, order numbers, products, VND amounts, codes, sizes); answers
are 1-3 sentences from three fixed phrasings per topic, so that a model of a few million
parameters trained for a minute on a CPU reproduces them readably. Answers never quote the
customer's details: such a model cannot copy an order number reliably and would invent one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SEED = 20240607
SAMPLES_PER_TOPIC = 70
SYSTEM_PROMPT = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."
DATA_DIR = Path(__file__).resolve().parent
CHATS_FILE = "support_chats.jsonl"
PROMPTS_FILE = "demo_prompts.jsonl"

PRODUCTS = (
    "áo thun", "quần jean", "giày thể thao", "tai nghe bluetooth", "nồi chiên không dầu",
    "máy xay sinh tố", "đồng hồ thông minh", "balo laptop", "váy liền", "áo khoác gió",
    "sạc dự phòng", "bàn phím cơ", "loa bluetooth", "máy sấy tóc", "bình giữ nhiệt",
)
DEVICES = (
    "tai nghe bluetooth", "nồi chiên không dầu", "máy xay sinh tố", "đồng hồ thông minh",
    "sạc dự phòng", "bàn phím cơ", "loa bluetooth", "máy sấy tóc", "quạt điện", "ấm siêu tốc",
)
CLOTHES = ("áo thun", "áo sơ mi", "quần jean", "quần short", "váy liền", "áo khoác", "giày thể thao")
LETTER_SIZES = ("S", "M", "L", "XL")
SHOE_SIZES = ("38", "39", "40", "41", "42")
CODES = ("GIAM50K", "FREESHIP", "SALE10", "KHACHMOI", "TET2025", "HE20", "VIP15")
CITIES = ("Hà Nội", "Đà Nẵng", "Cần Thơ", "Hải Phòng", "Huế", "Nha Trang", "Biên Hòa")
DELAY_DAYS = ("3", "4", "5", "6", "7", "10")
OPENERS = ("", "", "", "Chào shop, ", "Shop ơi, ", "Xin chào, ", "Cho mình hỏi, ", "Alo shop, ")


@dataclass(frozen=True)
class Topic:
    """One support topic: user phrasings and the few answer phrasings that carry its facts."""

    name: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]


TOPICS = (
    Topic(
        "order_tracking",
        (
            "đơn hàng {order} của mình đang ở đâu rồi?",
            "làm sao để theo dõi đơn hàng {order}?",
            "mình muốn kiểm tra tình trạng đơn {order}.",
            "đơn {order} mua {product} bao giờ thì giao tới?",
            "cho mình xem trạng thái vận chuyển của đơn hàng {order} với.",
            "mình đặt {product} hôm qua, làm sao biết đơn đang ở đâu?",
            "tra cứu giúp mình đơn hàng {order} nhé.",
        ),
        (
            "Bạn có thể theo dõi đơn hàng trong mục \"Đơn hàng của tôi\" trên website hoặc ứng dụng. "
            "Mã vận đơn cũng được gửi qua SMS và email khi đơn được giao cho đơn vị vận chuyển.",
            "Đơn hàng của bạn đang được đơn vị vận chuyển xử lý. Bạn vào mục \"Đơn hàng của tôi\" "
            "để xem trạng thái mới nhất và thời gian giao dự kiến.",
            "Bạn vui lòng vào mục \"Đơn hàng của tôi\" và chọn đơn hàng cần tra cứu "
            "để xem hành trình giao hàng. "
            "Thông thường đơn được giao trong 2-4 ngày làm việc.",
        ),
    ),
    Topic(
        "return_policy",
        (
            "chính sách đổi trả của shop thế nào?",
            "mình muốn trả lại {product} đã mua thì được không?",
            "mua {product} được {days} ngày rồi, còn trả hàng được không?",
            "điều kiện để đổi trả hàng là gì vậy?",
            "{product} bị lỗi do nhà sản xuất, mình có phải trả phí gửi lại không?",
            "trả hàng thì ai chịu phí vận chuyển?",
            "mình muốn hoàn trả đơn {order}, cần làm gì?",
        ),
        (
            "Cửa hàng nhận đổi trả trong vòng 30 ngày kể từ ngày nhận hàng, với điều kiện sản phẩm còn "
            "nguyên tem và chưa qua sử dụng. "
            "Nếu lỗi do nhà sản xuất, phí vận chuyển đổi trả sẽ được hoàn lại.",
            "Bạn được đổi trả trong 30 ngày nếu sản phẩm còn nguyên tem, chưa sử dụng. "
            "Trường hợp lỗi do nhà sản xuất, cửa hàng hoàn lại phí gửi hàng cho bạn.",
            "Bạn vui lòng tạo yêu cầu đổi trả trong mục \"Đơn hàng của tôi\" trong vòng 30 ngày. "
            "Sản phẩm cần còn nguyên tem, chưa qua sử dụng; "
            "nếu lỗi do nhà sản xuất, phí vận chuyển được hoàn lại.",
        ),
    ),
    Topic(
        "payment_methods",
        (
            "shop có những phương thức thanh toán nào?",
            "mình có thể thanh toán khi nhận hàng không?",
            "mua {product} giá {amount} thì trả góp hay chuyển khoản được không?",
            "shop có nhận thanh toán bằng ví MoMo không?",
            "mình muốn trả bằng thẻ Visa thì có được không?",
            "đơn {amount} có thanh toán COD được không?",
            "thanh toán đơn hàng bằng cách nào vậy?",
        ),
        (
            "Cửa hàng hỗ trợ thanh toán khi nhận hàng (COD), chuyển khoản ngân hàng, thẻ Visa/Mastercard "
            "và ví điện tử MoMo, ZaloPay. Bạn chọn phương thức ở bước thanh toán.",
            "Bạn có thể thanh toán bằng COD, chuyển khoản ngân hàng, thẻ Visa/Mastercard "
            "hoặc ví MoMo, ZaloPay. "
            "Tất cả phương thức đều được chọn ở bước thanh toán.",
            "Hiện cửa hàng nhận COD, chuyển khoản, thẻ tín dụng và ví điện tử MoMo, ZaloPay. "
            "Với mọi giá trị đơn hàng, bạn chọn phương thức phù hợp ở bước thanh toán.",
        ),
    ),
    Topic(
        "discount_code",
        (
            "mã giảm giá {code} dùng thế nào?",
            "sao mình nhập mã {code} mà không được?",
            "nhập mã giảm giá ở đâu vậy shop?",
            "đơn {amount} có áp dụng mã {code} được không?",
            "một đơn hàng dùng được mấy mã giảm giá?",
            "mã {code} còn hạn không shop?",
            "mình có mã {code}, dùng cho {product} được không?",
        ),
        (
            "Bạn nhập mã ở ô \"Mã giảm giá\" tại bước thanh toán. "
            "Mỗi đơn hàng áp dụng một mã và cần đạt giá trị đơn tối thiểu của mã.",
            "Nếu mã không áp dụng được, bạn vui lòng kiểm tra hạn sử dụng và giá trị đơn tối thiểu. "
            "Mỗi đơn hàng chỉ dùng được một mã giảm giá.",
            "Mã giảm giá được nhập tại bước thanh toán, mỗi đơn chỉ dùng một mã. "
            "Bạn xem hạn sử dụng và điều kiện của mã trong mục \"Ví voucher\".",
        ),
    ),
    Topic(
        "warranty",
        (
            "{product} mua ở shop được bảo hành bao lâu?",
            "chính sách bảo hành của shop thế nào?",
            "{product} của mình bị hỏng, có được bảo hành không?",
            "bảo hành mất bao lâu thì nhận lại máy?",
            "{product} bị rơi vỡ thì có được bảo hành không?",
            "{product} bị vào nước có bảo hành được không?",
            "mình muốn gửi {product} đi bảo hành, cần làm gì?",
        ),
        (
            "Sản phẩm được bảo hành 12 tháng cho các lỗi kỹ thuật, thời gian xử lý từ 7-14 ngày làm việc. "
            "Không bảo hành các trường hợp rơi vỡ, vào nước hoặc tự ý sửa chữa.",
            "Sản phẩm điện tử được bảo hành 12 tháng nếu gặp lỗi kỹ thuật. "
            "Thời gian bảo hành từ 7-14 ngày làm việc; "
            "sản phẩm bị rơi vỡ, vào nước hoặc đã tự sửa chữa sẽ không được bảo hành.",
            "Cửa hàng bảo hành 12 tháng cho lỗi kỹ thuật và xử lý trong 7-14 ngày làm việc. "
            "Các trường hợp rơi vỡ, vào nước hay tự ý sửa chữa nằm ngoài phạm vi bảo hành.",
        ),
    ),
    Topic(
        "late_delivery",
        (
            "đơn hàng {order} đã {days} ngày rồi mà chưa nhận được.",
            "sao đơn của mình giao trễ vậy shop?",
            "mình ở {city}, đặt {product} lâu rồi mà chưa thấy giao.",
            "đơn {order} quá hạn giao mà vẫn chưa tới, shop kiểm tra giúp.",
            "giao hàng chậm quá, đơn {order} bao giờ mới tới?",
            "đã {days} ngày mà {product} vẫn chưa được giao.",
            "đơn hàng bị trễ thì shop xử lý thế nào?",
        ),
        (
            "Cửa hàng rất xin lỗi vì đơn hàng của bạn bị giao trễ. Chúng tôi sẽ liên hệ đơn vị vận chuyển "
            "và phản hồi bạn trong vòng 24 giờ.",
            "Xin lỗi bạn vì sự chậm trễ này. Cửa hàng đã ghi nhận và sẽ kiểm tra với đơn vị vận chuyển; "
            "nếu hàng bị thất lạc, bạn sẽ được giao lại hoặc hoàn tiền.",
            "Rất xin lỗi bạn vì giao hàng trễ. Cửa hàng sẽ kiểm tra với đơn vị vận chuyển và phản hồi trong "
            "vòng 24 giờ; nếu đơn bị thất lạc, bạn được hoàn tiền đầy đủ.",
        ),
    ),
    Topic(
        "size_exchange",
        (
            "mình mua {clothes} size {size} bị chật, đổi sang size {size2} được không?",
            "đổi size {clothes} thế nào vậy shop?",
            "{clothes} size {size} rộng quá, mình muốn đổi size.",
            "mình muốn đổi {clothes} đơn {order} sang size {size2}.",
            "đổi size có mất phí không shop?",
            "size {size} không vừa, shop cho mình đổi nhé?",
            "muốn đổi size {clothes} thì cần điều kiện gì?",
        ),
        (
            "Bạn được đổi size miễn phí một lần trong 30 ngày nếu sản phẩm còn nguyên tem, "
            "chưa giặt và chưa sử dụng. "
            "Bạn tạo yêu cầu đổi size trong mục \"Đơn hàng của tôi\".",
            "Cửa hàng hỗ trợ đổi sang size khác nếu còn hàng, miễn phí một lần trong 30 ngày. "
            "Sản phẩm cần còn nguyên tem và chưa qua sử dụng.",
            "Bạn vui lòng tạo yêu cầu đổi size trong mục \"Đơn hàng của tôi\" và chọn size mới. "
            "Việc đổi size được miễn phí một lần nếu sản phẩm còn nguyên tem, chưa sử dụng.",
        ),
    ),
)

DEMO_QUESTIONS = (
    ("order_tracking", "Chào shop, đơn hàng DH735102 của mình đang ở đâu rồi?"),
    ("return_policy", "Chính sách đổi trả của shop thế nào?"),
    ("payment_methods", "Shop có những phương thức thanh toán nào?"),
    ("discount_code", "Mã giảm giá GIAM50K dùng thế nào?"),
    ("warranty", "Chính sách bảo hành của shop thế nào?"),
    ("late_delivery", "Sao đơn của mình giao trễ vậy shop?"),
    ("size_exchange", "Đổi size áo thun thế nào vậy shop?"),
)


def _order_number(rng: random.Random) -> str:
    return f"DH{rng.randint(100000, 999999)}"


def _amount_vnd(rng: random.Random) -> str:
    """A price like "1.250.000đ": thousands grouped with dots, as written in Vietnam."""
    thousands = rng.randrange(99, 5000, 10)
    return f"{thousands * 1000:,}đ".replace(",", ".")


def _slots(topic: Topic, rng: random.Random) -> dict[str, str]:
    """Slot values for one chat; warranty questions are about devices, not clothes."""
    clothes = rng.choice(CLOTHES)
    sizes = SHOE_SIZES if clothes == "giày thể thao" else LETTER_SIZES
    size, size2 = rng.sample(sizes, 2)
    return {
        "order": _order_number(rng),
        "product": rng.choice(DEVICES if topic.name == "warranty" else PRODUCTS),
        "amount": _amount_vnd(rng),
        "code": rng.choice(CODES),
        "days": rng.choice(DELAY_DAYS),
        "city": rng.choice(CITIES),
        "clothes": clothes,
        "size": size,
        "size2": size2,
    }


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _question(template: str, slots: Mapping[str, str], rng: random.Random) -> str:
    """The question, sometimes with a greeting, unless it already addresses the shop."""
    question = template.format(**slots)
    opener = rng.choice(OPENERS)
    if not opener or "shop" in question or question.startswith("cho mình"):
        return _capitalise(question)
    return opener + question


def _chat(system: str, user: str, assistant: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def build_chats(rng: random.Random) -> list[dict[str, object]]:
    """SAMPLES_PER_TOPIC chats per topic, interleaved by topic in a seeded shuffle."""
    samples: list[dict[str, object]] = []
    for topic in TOPICS:
        for _ in range(SAMPLES_PER_TOPIC):
            slots = _slots(topic, rng)
            user = _question(rng.choice(topic.questions), slots, rng)
            answer = rng.choice(topic.answers)
            samples.append({"messages": _chat(SYSTEM_PROMPT, user, answer), "topic": topic.name})
    rng.shuffle(samples)
    return samples


def build_demo_prompts() -> list[dict[str, object]]:
    """One fixed question per topic, phrased like the training data, without an answer."""
    return [
        {"messages": _chat(SYSTEM_PROMPT, question, None), "topic": topic}
        for topic, question in DEMO_QUESTIONS
    ]


def write_jsonl(rows: list[dict[str, object]], path: Path) -> None:
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(out_dir: Path = DATA_DIR) -> None:
    write_jsonl(build_chats(random.Random(SEED)), out_dir / CHATS_FILE)
    write_jsonl(build_demo_prompts(), out_dir / PROMPTS_FILE)


if __name__ == "__main__":
    main()
