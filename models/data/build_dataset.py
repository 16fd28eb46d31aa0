"""Generate the bundled shop data from one knowledge card: training chats, demo prompts, a held-out eval set.

Why it is built this way: a small pretrained student (SmolLM2-135M-Instruct, LoRA on a CPU) only learns
a shop's policies when every answer states the same facts in the same words, and what it learnt can only
be measured on questions it has never seen. So every file here follows `shop_card.json` (topics, each
with facts; a fact has a Vietnamese statement and the short surface forms a correct answer may use, the
first being the canonical one that answers use), and the eval questions come from a separate template
pool, a separate opener pool and a separate order-number range, and share no run of 6 words with a
training question.

Run from the repository root, optionally with an output folder (default: next to this script):

    python models/data/build_dataset.py [OUT_DIR]

It writes `support_chats.jsonl` (training chats), `demo_prompts.jsonl` (one question per topic) and
`eval_set.jsonl` (questions with the card facts a correct answer must state, and a reference answer).
The output is deterministic (fixed seeds, fixed template order): rerunning it on an unchanged script and
card rewrites the three files byte-identically.

Training questions come from many templates per topic (35-42) that use the words customers use for the
topic's intent (synonyms, colloquialisms, teen-code, with and without diacritics) and details that occur
across topics (VND amounts, order numbers, products, places, "miễn phí", "ship"): a small model taught on
a few templates picks a topic by such surface cues (a large amount -> installments) instead of by intent.

Answers are 1-3 sentences that state the topic's core facts, plus the facts the question asks about,
in a few phrasings per topic; delivery-time questions about a place get the answer for its region.
Answers never quote the customer's order number, code, amount or product: a small model cannot copy
them reliably and would invent them.
"""

from __future__ import annotations

import json
import random
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The eval set is drawn after the training chats and redraws an item's slots when its question shares a
# 6-word run with a training question, so which eval questions come out depends on the training questions.
# The eval set keeps the seed it was first drawn with (then SEED + 1 of a single SEED = 20240607); the
# training seed is one under which it still comes out byte for byte as first drawn: about one seed in ten,
# since some of its redraws were of places that training questions named after the same word ("ở {place}").
TRAIN_SEED = 20240610
EVAL_SEED = 20240608
TRAIN_PER_TOPIC = 150
EVAL_PER_TOPIC = 10
HELD_OUT_NGRAM = 6  # no run of this many words of an eval question occurs in a training question
MAX_TRIES = 2000
UNACCENTED_SHARE = 0.1  # questions typed without diacritics, on top of the templates written so
SYSTEM_PROMPT = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."
TASK = "response"
DATA_DIR = Path(__file__).resolve().parent
CARD_FILE = DATA_DIR / "shop_card.json"
CHATS_FILE = "support_chats.jsonl"
PROMPTS_FILE = "demo_prompts.jsonl"
EVAL_FILE = "eval_set.jsonl"
TRAIN_ORDERS = (100000, 599999)  # DH100000-DH599999
EVAL_ORDERS = (800000, 999999)  # DH800000-DH999999
REGION = "@region"  # the delivery-time fact of the region of the question's {place}
ALL_REGIONS = "@all"  # every region's delivery-time fact

PRODUCTS = (
    "áo thun", "quần jean", "giày thể thao", "tai nghe bluetooth", "nồi chiên không dầu", "máy xay sinh tố",
    "đồng hồ thông minh", "balo laptop", "váy liền", "áo khoác gió", "sạc dự phòng", "bàn phím cơ", "loa bluetooth",
    "máy sấy tóc", "bình giữ nhiệt",
)  # fmt: skip
DEVICES = (
    "tai nghe bluetooth", "nồi chiên không dầu", "máy xay sinh tố", "đồng hồ thông minh", "sạc dự phòng", "bàn phím cơ",
    "loa bluetooth", "máy sấy tóc", "quạt điện", "ấm siêu tốc",
)  # fmt: skip
CLOTHES = ("áo thun", "áo sơ mi", "quần jean", "quần short", "váy liền", "áo khoác", "giày thể thao", "dép sandal")
SHOES = frozenset({"giày thể thao", "dép sandal"})
LETTER_SIZES = ("S", "M", "L", "XL")
SHOE_SIZES = ("38", "39", "40", "41", "42")
CODES = ("FREESHIP", "SALE10", "TET2025", "HE20", "VIP15", "GIAM20", "SIEUSALE", "FLASH15")  # customers' codes
DAYS = ("2", "3", "4", "5", "6", "7", "10")
HOURS = ("7", "8", "9", "10")
TRAIN_OPENERS = (
    "", "", "", "Chào shop, ", "Shop ơi, ", "Xin chào, ", "Alo shop, ", "Ad ơi, ", "Chào bạn, ", "Hello shop, ",
    "Shop ơi cho hỏi, ",
)  # fmt: skip
EVAL_OPENERS = ("", "", "Hi shop, ", "Nhờ shop tư vấn giúp, ", "Làm phiền shop chút, ", "Bạn ơi, ", "Chào ad, ")

Slots = Mapping[str, str]
FIRST_ORDER = ("first_order_code", "first_order_discount", "first_order_minimum")


@dataclass(frozen=True)
class Fact:
    """One fact of the card; `alternatives[0]` is the canonical wording the answers use."""

    id: str
    topic: str
    statement: str
    alternatives: tuple[str, ...]
    core: bool
    places: tuple[str, ...] = ()

    @property
    def value(self) -> str:
        return self.alternatives[0]


@dataclass(frozen=True)
class Card:
    """The shop's knowledge card: its name and its facts, in card order, by topic."""

    name: str
    topics: tuple[str, ...]
    facts: tuple[Fact, ...]

    def fact(self, fact_id: str) -> Fact:
        return next(fact for fact in self.facts if fact.id == fact_id)

    def topic_facts(self, topic: str) -> tuple[Fact, ...]:
        return tuple(fact for fact in self.facts if fact.topic == topic)

    def core(self, topic: str) -> tuple[str, ...]:
        return tuple(fact.id for fact in self.topic_facts(topic) if fact.core)

    def region_facts(self) -> tuple[str, ...]:
        return tuple(fact.id for fact in self.facts if fact.places)

    def places(self) -> tuple[str, ...]:
        return tuple(place for fact in self.facts for place in fact.places)

    def region_of(self, place: str) -> str:
        return next(fact.id for fact in self.facts if place in fact.places)

    def values(self) -> dict[str, str]:
        """Placeholders of the answer phrasings: every fact id, and `shop_name`."""
        return {"shop_name": self.name} | {fact.id: fact.value for fact in self.facts}


@dataclass(frozen=True)
class Question:
    """A question template and the facts it asks about beyond the topic's core facts."""

    text: str
    asks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Phrasing:
    """How a topic is answered: lead phrasings stating the core facts, and sentences for asked facts.

    Each extra sentence states a group of facts. For the asked facts beyond the core, the sentences
    whose whole group was asked come first (all regions at once rather than one by one), then those
    that state a fact still missing, with the rest of their group; see `_extra_sentences`.
    `extras_first` puts them before the lead (delivery times: the region first, the rule after).
    """

    leads: tuple[str, ...]
    extras: tuple[tuple[tuple[str, ...], str], ...] = ()
    extras_first: bool = False


@dataclass(frozen=True)
class TopicSpec:
    name: str
    train: tuple[Question, ...]
    held_out: tuple[Question, ...]
    answers: Phrasing


def _q(text: str, *asks: str) -> Question:
    return Question(text, asks)


TOPICS = (
    TopicSpec(
        "order_tracking",
        (
            _q("đơn hàng {order} của mình đang ở đâu rồi?"),
            _q("làm sao để theo dõi đơn hàng {order}?"),
            _q("mình muốn kiểm tra tình trạng đơn {order}."),
            _q("cho mình xem trạng thái vận chuyển của đơn {order} với."),
            _q("em đặt {product} hôm qua, giờ muốn biết đơn đi tới đâu rồi."),
            _q("tra cứu giúp mình đơn hàng {order} nhé."),
            _q("mã vận đơn của đơn {order} xem ở đâu vậy?"),
            _q("đh {order} sao rồi shop, bao giờ tới?"),
            _q("đơn {order} mấy hôm nay không thấy cập nhật trạng thái gì cả.", "status_stale"),
            _q("trạng thái đơn {order} đứng yên {days} ngày rồi, shop check giúp em.", "status_stale"),
            _q("tôi muốn biết đơn hàng {order} đã được gửi đi chưa."),
            _q("ko thấy tin nhắn báo mã vận đơn cho đơn {order} shop ơi."),
            _q("xin hỏi tôi có thể xem hành trình đơn {product} ở mục nào?"),
            _q("đơn {order} hiện đang ở bước nào rồi ạ?"),
            _q("don {order} cua minh toi dau roi vay"),
            _q("cho mình hỏi đơn {order} giao tới khâu nào rồi ạ?"),
            _q("em vừa chốt {product} giá {amount}, giờ theo dõi đơn ở đâu vậy shop?"),
            _q("đơn {order} đã đóng gói xong chưa hay vẫn nằm trong kho?"),
            _q("check đơn giúp em với, mã đơn là {order}."),
            _q("làm sao biết shipper đã lấy hàng của đơn {order} chưa?"),
            _q("shop gửi mã vận đơn qua đâu thế, mình chưa nhận được gì."),
            _q("có cách nào xem đường đi của gói hàng ngay trên app không?"),
            _q("đơn {order} ship về {place} hiện tới bước nào rồi shop?"),
            _q("trên web đơn {order} vẫn ghi chờ lấy hàng từ hôm kia, sao vậy?", "status_stale"),
            _q("đơn {order} báo đang vận chuyển suốt {days} ngày nay không đổi gì.", "status_stale"),
            _q("trạng thái đơn hàng không nhảy mấy hôm rồi, em phải báo ai?", "status_stale"),
            _q("dh {order} sao chua thay cap nhat gi vay shop", "status_stale"),
            _q("ad tra giúp em cái đơn {order} với, đang tới khâu nào rồi."),
            _q("order {order} của mình giờ nằm ở bưu cục nào vậy?"),
            _q("mã vận đơn là gì, mình lấy ở đâu để tra đơn?"),
            _q("mình đã thanh toán {amount} cho đơn {order}, giờ xem đơn đi đâu rồi?"),
            _q("đơn {order} được freeship, giờ muốn xem tình trạng giao thì vào đâu?"),
            _q("hàng đã xuất kho chưa shop, đơn {order} ấy?"),
            _q("kiem tra don hang tren app o dau vay ad"),
            _q("trạng thái đơn của tôi xem tại mục nào trên website?"),
            _q("bn ơi đơn e tới đâu r, mã {order}"),
            _q("mình đặt {product} cho mẹ, làm sao theo dõi được hành trình đơn?"),
            _q("shop cho xin link theo dõi vận chuyển đơn {order} với."),
            _q("mình mới đặt {product} xong, xem đơn đang xử lý tới đâu ở chỗ nào?"),
            _q("đơn hàng của mình đã bàn giao cho bên vận chuyển chưa vậy shop?"),
            _q("làm sao nhận được mã vận đơn để tự tra hành trình?"),
            _q("tài khoản của em xem lịch sử mua và tình trạng giao ở đâu?"),
        ),
        (
            _q("{product} mình mua mã đơn {order}, giờ kiểm tra lộ trình giao ở chỗ nào?", "track_my_orders"),
            _q("tôi cần tra hành trình kiện hàng {order}, xem tại đâu được?", "track_my_orders"),
            _q("sau khi đặt xong thì mã vận đơn được gửi cho mình bằng cách nào?", "tracking_code"),
            _q("kiện hàng {order} của em không nhúc nhích suốt mấy ngày, phải làm sao?", "status_stale"),
            _q("muon biet kien {order} di den dau thi coi o muc nao", "track_my_orders"),
            _q("báo giúp em tình hình gói hàng {order} với, chờ mãi chưa thấy.", "track_my_orders", "tracking_code"),
            _q("lộ trình kiện {order} im re từ hôm kia tới giờ, ai kiểm tra hộ em với?", "status_stale"),
        ),
        Phrasing(
            (
                (
                    'Bạn theo dõi đơn trong mục "{track_my_orders}" trên website hoặc ứng dụng {shop_name} ạ. '
                    "Mã vận đơn cũng được gửi qua {tracking_code} khi đơn được giao cho đơn vị vận chuyển."
                ),
                (
                    'Bạn vào mục "{track_my_orders}" để xem trạng thái mới nhất và hành trình giao hàng ạ. '
                    "Khi đơn rời kho, shop gửi mã vận đơn qua {tracking_code} cho bạn."
                ),
                (
                    "Shop gửi mã vận đơn qua {tracking_code} ngay khi đơn được giao cho đơn vị vận chuyển ạ. "
                    'Bạn cũng xem được hành trình đơn trong mục "{track_my_orders}" trên website hoặc ứng dụng.'
                ),
            ),
            (
                (
                    ("status_stale",),
                    (
                        "Nếu trạng thái không cập nhật sau {status_stale}, bạn gọi hotline {hotline} để shop kiểm tra "
                        "giúp nhé."
                    ),
                ),
            ),
        ),
    ),
    TopicSpec(
        "delivery_time",
        (
            _q("giao hàng về {place} mất mấy ngày?", REGION),
            _q("mình ở {place}, đặt hôm nay thì bao lâu nhận được hàng?", REGION),
            _q("ship tới {place} bao lâu vậy shop?", REGION),
            _q("đơn gửi đi {place} thường mất bao nhiêu ngày?", REGION),
            _q("em ở {place}, đặt {product} thì mấy ngày có hàng ạ?", REGION),
            _q("thời gian giao hàng của shop là bao lâu?", ALL_REGIONS),
            _q("shop giao hàng toàn quốc mất mấy ngày?", ALL_REGIONS),
            _q("giao ve {place} may ngay vay shop", REGION),
            _q("tôi ở {place}, xin hỏi thời gian vận chuyển dự kiến là bao lâu?", REGION),
            _q("đặt {product} giao {place}, khoảng khi nào tới?", REGION),
            _q("chủ nhật shop có giao hàng không?", ALL_REGIONS),
            _q("mua hàng xong thường bao lâu thì nhận được vậy ad?", ALL_REGIONS),
            _q("nhà mình ở {place}, ship có nhanh không shop?", REGION),
            _q("đặt hàng hôm nay thì bao giờ giao tới {place}?", REGION),
            _q("gửi hàng đi {place} mất bao lâu ạ?", REGION),
            _q("hàng từ kho tới {place} đi mấy ngày vậy shop?", REGION),
            _q("mình cần gấp {product} trước cuối tuần, giao {place} có kịp không?", REGION),
            _q("bao lâu thì shipper giao tới {place}?", REGION),
            _q("mua {product} giá {amount}, ship về {place} mất mấy hôm?", REGION),
            _q("shop giao hàng vùng sâu vùng xa có lâu không?", ALL_REGIONS),
            _q("giao nội thành mất mấy ngày, còn đi tỉnh thì sao?", ALL_REGIONS),
            _q("đơn đặt tối thứ bảy thì chủ nhật có được giao không?", ALL_REGIONS),
            _q("ngày lễ shop có giao hàng không hay nghỉ?", ALL_REGIONS),
            _q("thời gian ship dự kiến bao lâu vậy shop?", ALL_REGIONS),
            _q("kể từ lúc đặt thì bao lâu nhận được hàng?", ALL_REGIONS),
            _q("khoảng mấy ngày thì hàng về tới {place}?", REGION),
            _q("địa chỉ nhận hàng của mình tại {place}, mấy ngày có hàng vậy shop?", REGION),
            _q("giao hang ve {place} mat bao lau", REGION),
            _q("hôm nay thứ sáu đặt thì đầu tuần có nhận được không, địa chỉ tại {place}?", REGION),
            _q("tầm bao lâu hàng tới tay vậy ad?", ALL_REGIONS),
            _q("shop có giao cuối tuần không?", ALL_REGIONS),
            _q("đặt {product} thì khoảng bao lâu ship tới?", ALL_REGIONS),
            _q("thoi gian giao hang bao lau vay ad", ALL_REGIONS),
            _q("mấy ngày ship tới {place} ạ?", REGION),
            _q("mình mua đơn {amount} giao đi {place}, bao lâu tới?", REGION),
            _q("đơn {order} vừa đặt, giao tới {place} khoảng bao giờ có?", REGION),
            _q("tỉnh lẻ thì giao lâu hơn thành phố lớn không?", ALL_REGIONS),
            _q("giao hàng có tính ngày chủ nhật không shop?", ALL_REGIONS),
            _q("đặt bây giờ thì tầm hôm nào shipper tới {place}?", REGION),
            _q("đơn {order} đặt sáng nay, mấy ngày thì nhận được?", ALL_REGIONS),
        ),
        (
            _q("nếu chốt đơn ngay bây giờ thì khi nào hàng đến nơi, nhà em ở {place}?", REGION),
            _q("từ lúc đặt tới lúc nhận ở {place} mất khoảng mấy hôm?", REGION),
            _q("hàng chuyển ra {place} thì cần đợi tầm bao lâu?", REGION),
            _q("bên mình vận chuyển tới các khu vực khác nhau mất thời gian ra sao?", ALL_REGIONS),
            _q("nhan hang o {place} thi doi khoang bao lau", REGION),
            _q("ngày lễ với chủ nhật có được tính vào thời gian chuyển hàng không?", "delivery_no_sunday"),
            _q("gửi về tận {place} thì chừng nào em cầm được hàng?", REGION),
        ),
        Phrasing(
            (
                "Thời gian giao hàng tính theo ngày làm việc, {delivery_no_sunday} và ngày lễ ạ.",
                "Shop tính thời gian giao theo ngày làm việc, {delivery_no_sunday} và ngày lễ ạ.",
            ),
            (
                (
                    ("delivery_inner", "delivery_big_city", "delivery_province"),
                    (
                        "Shop giao nội thành Hà Nội và TP.HCM trong {delivery_inner}, các thành phố lớn khác như Đà "
                        "Nẵng, Hải Phòng, Cần Thơ trong {delivery_big_city}, các tỉnh khác và vùng sâu, vùng xa trong "
                        "{delivery_province}."
                    ),
                ),
                (("delivery_inner",), "Đơn nội thành Hà Nội và TP.HCM được giao trong {delivery_inner} làm việc."),
                (
                    ("delivery_big_city",),
                    (
                        "Đơn đến các thành phố lớn khác như Đà Nẵng, Hải Phòng, Cần Thơ được giao trong "
                        "{delivery_big_city} làm việc."
                    ),
                ),
                (
                    ("delivery_province",),
                    "Đơn đến các tỉnh khác và vùng sâu, vùng xa được giao trong {delivery_province} làm việc.",
                ),
            ),
            extras_first=True,
        ),
    ),
    TopicSpec(
        "shipping_fee",
        (
            _q("phí ship của shop là bao nhiêu?"),
            _q("đơn {amount} có được miễn phí vận chuyển không?"),
            _q("mua {product} thì tiền ship bao nhiêu vậy?"),
            _q("shop có freeship không?"),
            _q("mình ở {place}, phí giao hàng tính thế nào?"),
            _q("đơn bao nhiêu thì được freeship vậy shop?"),
            _q("tiền ship có tính theo cân nặng không?"),
            _q("phi ship bao nhieu v shop"),
            _q("cho tôi hỏi đơn hàng trị giá {amount} phải trả phí vận chuyển bao nhiêu?"),
            _q("mua thêm bao nhiêu nữa thì được miễn ship ạ?"),
            _q("ship về {place} có đắt hơn không?"),
            _q("đặt {product} giá {amount} có mất phí ship ko ad?"),
            _q("tiền ship đơn này hết bao nhiêu vậy shop?"),
            _q("phí vận chuyển về {place} là bao nhiêu?"),
            _q("mua {product} có được freeship không ạ?"),
            _q("đơn {amount} thì có phải trả tiền ship không?"),
            _q("cước ship đi {place} hết bao nhiêu tiền?"),
            _q("cước phí giao hàng của shop tính sao?"),
            _q("shop có miễn phí vận chuyển cho đơn lớn không?"),
            _q("đơn trên {amount} có được free ship không?"),
            _q("mua 2 món thì tính phí ship 1 lần hay 2 lần?"),
            _q("phí giao hàng nội thành với đi tỉnh có chênh nhau không?"),
            _q("hàng cồng kềnh như {product} có bị tính thêm phí ship không?"),
            _q("mình sống ở vùng xa, ship có đắt hơn không?"),
            _q("free ship từ bao nhiêu vậy ad?"),
            _q("đơn {amount} rồi mà vẫn bị tính phí ship, sao vậy?"),
            _q("đơn {order} sao lại bị cộng tiền ship vào ạ?"),
            _q("shop có chương trình freeship toàn quốc không?"),
            _q("tien ship di {place} het nhieu khong shop"),
            _q("mien phi van chuyen cho don bao nhieu tro len"),
            _q("phí ship bn vậy shop"),
            _q("gửi vùng sâu vùng xa có thu thêm phụ phí vận chuyển không?"),
            _q("tôi mua {product} giá {amount}, tổng tiền đã gồm phí giao hàng chưa?"),
            _q("đơn nhỏ vài chục nghìn cũng mất phí ship à?"),
            _q("đơn tối thiểu bao nhiêu mới được freeship?"),
            _q("phí vận chuyển có phụ thuộc cân nặng với khoảng cách không?"),
            _q("đặt {product} giao tới {place}, phí ship tính thế nào?"),
            _q("trả COD thì phí ship có khác chuyển khoản không?"),
            _q("đơn {order} của mình {amount}, sao vẫn tính phí giao hàng?"),
        ),
        (
            _q("giỏ hàng của em đang {amount}, có phải trả thêm cước giao không?", "shipping_flat", "free_shipping"),
            _q("cước vận chuyển mỗi đơn bên mình thu bao nhiêu tiền?", "shipping_flat"),
            _q("mức tối thiểu để được miễn cước giao hàng là bao nhiêu?", "free_shipping"),
            _q("gửi hàng lên {place} thì cước có khác nội thành không?", "shipping_flat"),
            _q("k muon mat phi giao thi can mua toi thieu bao nhieu", "free_shipping"),
            _q("đặt hai món nhỏ thì có bị tính phí giao hai lần không?", "shipping_flat"),
        ),
        Phrasing(
            (
                (
                    "Phí giao hàng của shop đồng giá {shipping_flat} cho mỗi đơn trên toàn quốc ạ. "
                    "Đơn từ {free_shipping} trở lên được miễn phí giao hàng."
                ),
                (
                    "Shop miễn phí giao hàng cho đơn từ {free_shipping} ạ. "
                    "Đơn dưới mức này tính phí đồng giá {shipping_flat}, không phân biệt khu vực hay cân nặng."
                ),
                (
                    "Mọi đơn dưới {free_shipping} chịu phí giao hàng đồng giá {shipping_flat} ạ. "
                    "Từ {free_shipping} trở lên, bạn được miễn phí giao hàng toàn quốc."
                ),
            ),
        ),
    ),
    TopicSpec(
        "late_delivery",
        (
            _q("đơn hàng {order} đã {days} ngày rồi mà chưa nhận được."),
            _q("sao đơn của mình giao trễ vậy shop?"),
            _q("mình ở {place}, đặt {product} lâu rồi mà chưa thấy giao."),
            _q("đơn {order} quá hạn giao mà vẫn chưa tới, shop kiểm tra giúp."),
            _q("giao hàng chậm quá, đơn {order} bao giờ mới tới?"),
            _q("đã {days} ngày mà {product} vẫn chưa được giao."),
            _q("đơn hàng bị trễ thì shop xử lý thế nào?"),
            _q("giao trễ thì có được đền bù gì không?"),
            _q("đơn {order} hình như bị thất lạc rồi shop ơi.", "lost_parcel"),
            _q("don {order} tre qua roi shop oi"),
            _q("tôi rất bực vì đơn {order} trễ hẹn, bên shop giải quyết ra sao?"),
            _q("shipper báo mất hàng của đơn {order}, giờ sao ạ?", "lost_parcel"),
            _q("quá ngày dự kiến {days} hôm rồi mà chưa thấy hàng đâu."),
            _q("đơn giao muộn thì shop có bồi thường gì không?"),
            _q("giao trễ hẹn {days} ngày thì được đền bù bao nhiêu?"),
            _q("shipper làm mất hàng của mình rồi, shop tính sao?", "lost_parcel"),
            _q("đơn {order} bị thất lạc thì có được hoàn tiền không?", "lost_parcel"),
            _q("hàng bị mất trên đường vận chuyển thì ai chịu trách nhiệm?", "lost_parcel"),
            _q("đặt {product} giá {amount} mà giờ vẫn chưa tới, trễ hơn dự kiến rồi."),
            _q("ngày hẹn giao là hôm qua mà hôm nay vẫn chưa có hàng."),
            _q("sao lâu thế shop, đơn {order} trễ {days} ngày rồi."),
            _q("đơn chậm quá, bao lâu thì shop phản hồi cho mình?"),
            _q("trễ hơn 2 ngày thì được voucher bao nhiêu vậy?"),
            _q("giao chậm có được tặng mã giảm giá không shop?"),
            _q("don {order} giao cham qua, co den bu gi ko"),
            _q("hang bi that lac thi shop giai quyet sao", "lost_parcel"),
            _q("đơn giao không đúng hẹn thì shop có chính sách gì?"),
            _q("bên vận chuyển làm thất lạc đơn {order}, mình có được gửi lại đơn khác không?", "lost_parcel"),
            _q("đơn {order} được miễn phí ship mà giao trễ thì có được bù không?"),
            _q("đã quá hạn giao mà hàng vẫn bặt vô âm tín."),
            _q("đơn của tôi chậm {days} ngày so với ngày dự kiến, tôi được quyền lợi gì?"),
            _q("hàng về trễ làm mình lỡ việc, shop tính sao?"),
            _q("delay giao hàng thế này có voucher bù không ad?"),
            _q("ship trễ quá ad ơi, đơn {order} hẹn từ tuần trước."),
            _q("app báo đã giao mà mình chưa nhận được gì, có phải hàng bị mất không?", "lost_parcel"),
            _q("bao lâu sau khi báo trễ thì shop trả lời mình?"),
            _q("đơn {amount} giao muộn cả tuần, shop có đền gì không?"),
            _q("hàng đến muộn so với ngày hẹn, shop có hỗ trợ gì không?"),
            _q("nhân viên giao hàng làm mất kiện của mình thì sao ạ?", "lost_parcel"),
        ),
        (
            _q(
                "quá ngày hẹn mà kiện {order} vẫn bặt tăm, bên mình bồi thường thế nào?",
                "late_voucher",
                "late_threshold",
            ),
            _q("chờ hàng sốt ruột quá, bao giờ bên mình trả lời em về vụ đơn chậm?", "late_response"),
            _q("nếu bưu tá làm thất thoát gói hàng {order} thì em được xử lý ra sao?", "lost_parcel"),
            _q("nhan hang muon hon du kien {days} hom co duoc bu gi khong", "late_voucher"),
            _q(
                "hàng về {place} chậm hơn lịch báo, bên mình có hỗ trợ gì cho khách không?",
                "late_voucher",
                "late_response",
            ),
            _q("trễ hẹn bao nhiêu lâu thì mới được tặng voucher?", "late_threshold"),
        ),
        Phrasing(
            (
                (
                    "Shop rất xin lỗi vì đơn giao chậm, shop sẽ kiểm tra với đơn vị vận chuyển và phản hồi bạn "
                    "trong vòng {late_response} ạ. Đơn trễ {late_threshold} so với ngày dự kiến được tặng voucher "
                    "{late_voucher}."
                ),
                (
                    "Shop xin lỗi bạn vì sự chậm trễ này và sẽ phản hồi trong {late_response} sau khi kiểm tra với "
                    "đơn vị vận chuyển ạ. Nếu đơn trễ {late_threshold} so với dự kiến, bạn được tặng voucher "
                    "{late_voucher}."
                ),
            ),
            ((("lost_parcel",), "Nếu hàng thất lạc, shop giao lại đơn mới hoặc {lost_parcel} cho bạn."),),
        ),
    ),
    TopicSpec(
        "order_cancellation",
        (
            _q("mình muốn hủy đơn {order} được không?"),
            _q("làm sao để hủy đơn hàng vậy shop?"),
            _q("đơn {order} đặt nhầm {product}, hủy giúp mình với."),
            _q("hủy đơn có mất phí không?"),
            _q("đơn đã chuyển khoản rồi mà hủy thì bao lâu được hoàn tiền?", "cancel_refund"),
            _q("đơn {order} đang giao rồi còn hủy được không?"),
            _q("huy don {order} kieu gi shop oi"),
            _q("tôi đã thanh toán qua MoMo cho đơn {order}, giờ muốn hủy thì tiền trả lại thế nào?", "cancel_refund"),
            _q("em đổi ý, {product} không cần nữa, hủy đơn được ko ạ?"),
            _q("shipper đang trên đường giao thì mình có từ chối được không?"),
            _q("đơn {order} trả bằng thẻ rồi, hủy thì mấy ngày hoàn tiền?", "cancel_refund"),
            _q("hủy đơn {order} giúp mình, mình không cần nữa."),
            _q("mình lỡ đặt trùng hai đơn giống nhau, hủy một cái được không?"),
            _q("đơn {order} chưa giao thì hủy có mất phí không?"),
            _q("nút hủy đơn nằm ở đâu trên app vậy shop?"),
            _q("đơn {amount} đã chuyển khoản, giờ hủy thì hoàn tiền bao lâu?", "cancel_refund"),
            _q("muốn đổi địa chỉ nên hủy đơn đặt lại được không?"),
            _q("đơn đã rời kho rồi còn hủy kịp không ạ?"),
            _q("shipper gọi giao mà mình không muốn nhận nữa thì làm sao?"),
            _q("hủy đơn COD có bị phạt gì không?"),
            _q("huy don da thanh toan momo thi bao lau hoan tien", "cancel_refund"),
            _q("mình chọn sai màu, hủy đơn {order} được không?"),
            _q("đơn {order} trả góp qua thẻ tín dụng, giờ hủy thì tiền hoàn về lúc nào?", "cancel_refund"),
            _q("em bấm đặt hàng nhầm, hủy thế nào ạ?"),
            _q("đơn {order} đang chờ xác nhận, hủy được chứ?"),
            _q("hàng đang trên đường giao, giờ muốn hủy thì làm sao?"),
            _q("mình muốn hủy đơn để dùng mã giảm giá đặt lại, được không?"),
            _q("đã chuyển khoản {amount} rồi mà hủy đơn thì mất bao lâu tiền về?", "cancel_refund"),
            _q("hủy đơn thì bao giờ nhận lại tiền đã trả bằng thẻ Visa?", "cancel_refund"),
            _q("k muốn mua nữa, cancel đơn {order} giùm em"),
            _q("cancel order được không shop"),
            _q("đặt {product} xong thấy chỗ khác rẻ hơn, hủy có sao không?"),
            _q("huy don co mat phi gi khong ad"),
            _q("hủy đơn miễn phí trong bao lâu sau khi đặt?"),
            _q("đơn {order} freeship rồi mà hủy thì có bị trừ tiền ship không?"),
            _q("nhận hàng tại nhà mà không lấy nữa thì có bị sao không?"),
        ),
        (
            _q("mình lỡ tay đặt hai lần, bỏ bớt một đơn {order} có được không?", "cancel_before_shipping"),
            _q(
                "kiện {order} đã rời kho sang bên vận chuyển, giờ em không muốn lấy nữa thì sao?",
                "cancel_after_shipping",
            ),
            _q("trả trước bằng ví rồi mà hủy đơn thì mấy hôm tiền về tài khoản?", "cancel_refund"),
            _q("dat nham mau roi, huy bo don {order} co ton phi khong", "cancel_before_shipping"),
            _q("bỏ đơn {order} sau khi đã trả tiền thì nhận lại tiền trong bao lâu?", "cancel_refund"),
            _q(
                "không còn nhu cầu mua {product} nữa, em rút lại đơn được không ạ?",
                "cancel_before_shipping",
                "cancel_after_shipping",
            ),
        ),
        Phrasing(
            (
                (
                    'Bạn hủy đơn miễn phí trong mục "{track_my_orders}" khi đơn {cancel_before_shipping} ạ. '
                    "Nếu đơn đã rời kho, bạn có thể {cancel_after_shipping} hàng khi shipper tới."
                ),
                (
                    'Đơn {cancel_before_shipping} thì bạn hủy được miễn phí ngay trong mục "{track_my_orders}" ạ. '
                    "Đơn đã rời kho thì không hủy được nữa, bạn vui lòng {cancel_after_shipping} hàng giúp shop."
                ),
            ),
            ((("cancel_refund",), "Đơn đã thanh toán trước sẽ được hoàn tiền trong {cancel_refund} làm việc."),),
        ),
    ),
    TopicSpec(
        "return_policy",
        (
            _q("chính sách đổi trả của shop thế nào?"),
            _q("mình muốn trả lại {product} đã mua thì được không?"),
            _q("mua {product} được {days} ngày rồi, còn trả hàng được không?"),
            _q("điều kiện để đổi trả hàng là gì vậy?"),
            _q("{product} bị lỗi do nhà sản xuất, mình có phải trả phí gửi lại không?", "return_shipping_fee"),
            _q("trả hàng thì ai chịu phí vận chuyển?", "return_shipping_fee"),
            _q("mình muốn hoàn trả đơn {order}, cần làm gì?"),
            _q("trả hàng xong bao lâu thì nhận được tiền?", "refund_time"),
            _q("đồ lót có đổi trả được không shop?", "return_exclusions"),
            _q("tra hang {product} duoc ko shop"),
            _q("hàng giảm giá sâu có được trả lại không?", "return_exclusions"),
            _q("tôi đã bóc hộp {product} nhưng chưa dùng, có trả lại được không?"),
            _q("shop giao sai {product} thì phí gửi trả ai chịu?", "return_shipping_fee"),
            _q("hoàn hàng đơn {order} rồi, khi nào em nhận lại tiền?", "refund_time"),
            _q("hàng mua về dùng không hợp, trả lại được không?"),
            _q("trả hàng được trong bao nhiêu ngày?"),
            _q("mình nhận {product} được {days} ngày, muốn hoàn hàng lấy tiền được không?"),
            _q("{product} giá {amount} mua ở shop trả lại thì được hoàn đủ tiền không?", "refund_time"),
            _q("hàng bị lỗi thì gửi trả có mất phí ship không?", "return_shipping_fee"),
            _q("đổi ý không muốn dùng nữa thì phí gửi trả ai chịu?", "return_shipping_fee"),
            _q("hàng sale 60% có trả được không?", "return_exclusions"),
            _q("gift card có trả lại được không shop?", "return_exclusions"),
            _q("trả hàng có cần giữ hộp với hóa đơn không?"),
            _q("tem mác bị cắt rồi còn trả hàng được không?"),
            _q("hoàn tiền trả hàng mất mấy ngày làm việc?", "refund_time"),
            _q("tra hang hoan tien duoc khong shop"),
            _q("hàng giao sai mẫu thì trả lại thế nào?", "return_shipping_fee"),
            _q("mình muốn return {product}, shop có nhận không?"),
            _q("đơn {order} giá {amount}, giờ muốn trả lại một món được không?"),
            _q("chính sách hoàn hàng bên shop ra sao ad?"),
            _q("{product} mua {days} ngày trước bị trầy lúc giao, trả lại được chứ?"),
            _q("đồ đã dùng thử một lần có trả được không?"),
            _q("trả hàng có mất phí gì không?", "return_shipping_fee"),
            _q("hàng khuyến mãi có được đổi trả không?", "return_exclusions"),
            _q("tra hang xong bao lau tien ve vi", "refund_time"),
            _q("mình không ưng {product}, muốn gửi trả shop lấy lại tiền."),
            _q("đơn {order} mua bằng mã giảm giá thì trả hàng được hoàn bao nhiêu?", "refund_time"),
        ),
        (
            _q("nhận {product} về thấy không ưng, trong thời hạn nào thì gửi lại cho shop được?", "return_window"),
            _q("hàng gửi trả cần đáp ứng những yêu cầu gì mới được chấp nhận?", "return_condition"),
            _q("gửi lại món hàng hỏng từ khâu sản xuất thì tiền cước ai trả?", "return_shipping_fee"),
            _q("kho nhận lại hàng hoàn rồi, bao giờ tiền về tài khoản của em?", "refund_time"),
            _q("thẻ quà tặng mua rồi có hoàn lại được không?", "return_exclusions"),
            _q("doi y khong lay {product} nua thi gui tra trong bao lau", "return_window"),
            _q(
                "{product} em nhận {days} hôm trước, chưa bóc seal, hoàn trả còn kịp không?",
                "return_window",
                "return_condition",
            ),
        ),
        Phrasing(
            (
                (
                    "Shop nhận đổi trả trong vòng {return_window} kể từ ngày nhận hàng ạ. "
                    "Sản phẩm cần còn {return_condition}, chưa qua sử dụng và đủ hộp, phụ kiện, hóa đơn."
                ),
                (
                    "Bạn được đổi trả trong {return_window} kể từ khi nhận hàng, với điều kiện sản phẩm còn "
                    "{return_condition}, chưa sử dụng và còn đủ hộp, phụ kiện ạ."
                ),
                (
                    'Bạn tạo yêu cầu đổi trả trong mục "{track_my_orders}" trong vòng {return_window} kể từ ngày '
                    "nhận hàng ạ. Sản phẩm phải còn {return_condition}, chưa qua sử dụng và đủ phụ kiện."
                ),
            ),
            (
                (
                    ("return_shipping_fee",),
                    (
                        "Shop hoàn phí gửi hàng nếu {return_shipping_fee} hoặc giao sai sản phẩm; đổi ý thì bạn tự "
                        "chịu phí."
                    ),
                ),
                (
                    ("refund_time",),
                    "Tiền hoàn được chuyển trong {refund_time} làm việc sau khi kho nhận và kiểm tra hàng.",
                ),
                (
                    ("return_exclusions",),
                    "Shop không nhận đổi trả {return_exclusions}, thẻ quà tặng và sản phẩm giảm trên 50%.",
                ),
            ),
        ),
    ),
    TopicSpec(
        "size_exchange",
        (
            _q("mình mua {clothes} size {size} bị chật, đổi sang size {size2} được không?"),
            _q("đổi size {clothes} thế nào vậy shop?"),
            _q("{clothes} size {size} rộng quá, mình muốn đổi size."),
            _q("mình muốn đổi {clothes} đơn {order} sang size {size2}."),
            _q("đổi size có mất phí không shop?"),
            _q("size {size} không vừa, shop cho mình đổi nhé?"),
            _q("muốn đổi size {clothes} thì cần điều kiện gì?"),
            _q("đổi sang size {size2} mà giá cao hơn thì có phải bù tiền không?", "size_price_difference"),
            _q("doi size {clothes} duoc may lan vay shop"),
            _q("em giặt {clothes} một lần rồi, còn đổi size được không?"),
            _q("đổi size thì đổi trong bao lâu?"),
            _q(
                "tôi muốn đổi {clothes} size {size} lấy size {size2}, nếu rẻ hơn thì shop trả lại tiền không?",
                "size_price_difference",
            ),
            _q("{clothes} hơi rộng, đổi xuống size {size2} được không shop?"),
            _q("đổi size lần thứ hai có mất phí không?"),
            _q("đổi size có phải trả phí ship không?"),
            _q("{clothes} bị chật, muốn đổi size to hơn thì làm sao?"),
            _q("đổi size {clothes} được trong bao nhiêu ngày?"),
            _q("mình đã cắt mác {clothes} rồi còn đổi size được không?"),
            _q("đổi size mà size mới đắt hơn {amount} thì sao?", "size_price_difference"),
            _q("muốn đổi size thì gửi hàng lại cho shop kiểu gì?"),
            _q("doi size mien phi duoc may lan"),
            _q("em mặc {clothes} size {size} chật quá, đổi size có tốn phí không?"),
            _q("đơn {order} có {clothes} size {size}, giờ đổi size {size2} thì làm gì?"),
            _q("mua {clothes} giá {amount} mà lệch size, đổi được không?"),
            _q("đổi size trong app ở mục nào vậy ad?"),
            _q("{clothes} mình mới mặc thử, chưa giặt, đổi size được không?"),
            _q("sz {size} ko vừa, đổi sz {size2} dc ko shop"),
            _q("đổi size có cần giữ nguyên tem không?"),
            _q("giày dép có được đổi size không hay chỉ quần áo?"),
            _q("size to quá mặc không được, shop đổi giúp mình nhé."),
            _q("tôi muốn đổi kích cỡ {clothes}, quy định thế nào?"),
            _q("{clothes} size {size} bị bó, đổi lên {size2} mà giá khác thì tính sao?", "size_price_difference"),
            _q("lần trước đổi size rồi, giờ đổi tiếp có mất tiền không?"),
            _q("nhận hàng 20 ngày rồi còn đổi size được không?"),
            _q("đổi size có được miễn phí vận chuyển không shop?"),
            _q("chọn nhầm size {size} lúc đặt, đổi sang {size2} giúp em được không?"),
        ),
        (
            _q("{clothes} mặc không vừa người, gửi lại lấy cỡ khác có tốn tiền không?", "size_free_once"),
            _q("hạn chót để yêu cầu đổi cỡ là bao nhiêu ngày?", "size_window"),
            _q("đồ đã qua nước giặt rồi thì còn được đổi cỡ không?", "size_condition"),
            _q("cỡ mới có giá khác cỡ cũ thì xử lý tiền thế nào?", "size_price_difference"),
            _q("{clothes} {size} bi chat, muon lay {size2} co mien phi khong", "size_free_once"),
            _q(
                "nhận {clothes} được ít hôm, giờ muốn lấy số to hơn thì phải đáp ứng gì?",
                "size_condition",
                "size_window",
            ),
        ),
        Phrasing(
            (
                (
                    "Quần áo và giày dép được đổi size {size_free_once} trong vòng {size_window} kể từ ngày nhận hàng "
                    "ạ. Sản phẩm cần còn nguyên tem mác và {size_condition}."
                ),
                (
                    "Bạn được đổi size {size_free_once} trong {size_window}, miễn là sản phẩm còn nguyên tem mác, "
                    '{size_condition} ạ. Bạn tạo yêu cầu đổi size trong mục "{track_my_orders}" nhé.'
                ),
                (
                    "Shop hỗ trợ đổi size {size_free_once} trong vòng {size_window} nếu sản phẩm còn nguyên tem mác và "
                    "{size_condition} ạ. Bạn chọn size mới khi tạo yêu cầu đổi."
                ),
            ),
            (
                (
                    ("size_price_difference",),
                    (
                        "Nếu size mới có giá cao hơn, bạn bù phần {size_price_difference}; nếu thấp hơn, shop hoàn lại "
                        "phần {size_price_difference} cho bạn."
                    ),
                ),
            ),
        ),
    ),
    TopicSpec(
        "warranty",
        (
            _q("{device} mua ở shop được bảo hành bao lâu?"),
            _q("chính sách bảo hành của shop thế nào?"),
            _q("{device} của mình bị hỏng, có được bảo hành không?"),
            _q("bảo hành mất bao lâu thì nhận lại máy?"),
            _q("{device} bị rơi vỡ thì có được bảo hành không?"),
            _q("{device} bị vào nước có bảo hành được không?"),
            _q("mình muốn gửi {device} đi bảo hành, cần làm gì?", "warranty_shipping_free"),
            _q("gửi bảo hành có mất phí ship không?", "warranty_shipping_free"),
            _q("bao hanh {device} bao lau v shop"),
            _q("{device} mới dùng vài tháng đã lỗi nguồn, shop xử lý sao?"),
            _q("tôi tự sửa {device} rồi thì còn bảo hành không?"),
            _q("{device} em mua tháng trước bị chập chờn, bảo hành ở đâu ạ?", "warranty_shipping_free"),
            _q("{device} bảo hành mấy tháng vậy shop?"),
            _q("{device} giá {amount} có được bảo hành không?"),
            _q("{device} dùng được mấy tháng thì hư, còn bảo hành không?"),
            _q("gửi bảo hành mất mấy ngày thì có máy lại?"),
            _q("bảo hành có mất tiền sửa không?"),
            _q("{device} bị chập điện cháy thì có bảo hành không?"),
            _q("bảo hành tính từ ngày mua hay ngày nhận hàng?"),
            _q("máy lỗi kỹ thuật trong năm đầu có được sửa free không?"),
            _q("{device} hư rồi, shop đổi mới hay sửa vậy?"),
            _q("gửi {device} về bảo hành thì phí vận chuyển ai trả?", "warranty_shipping_free"),
            _q("bao hanh {device} o dau vay shop"),
            _q("{device} không lên nguồn, bảo hành được không ạ?"),
            _q("mình làm rơi {device} nứt vỏ, có được bảo hành không?"),
            _q("đơn {order} mua {device}, giờ hỏng thì bảo hành thế nào?"),
            _q("shop có bảo hành 1 đổi 1 không?"),
            _q("mua {device} giá {amount} thì bảo hành bao lâu ad?"),
            _q("bh bao lâu vậy shop"),
            _q("mang {device} ra tiệm ngoài sửa rồi có mất bảo hành không?"),
            _q("{device} lỗi do nhà sản xuất thì bảo hành bao lâu?"),
            _q("trung tâm bảo hành xử lý mất bao lâu?"),
            _q("bảo hành {device} có phải tự ship đi không hay shop lo?", "warranty_shipping_free"),
            _q("đồ gia dụng có được bảo hành không shop?"),
            _q("{device} bị cháy do điện yếu, shop sửa giúp được không?"),
            _q("máy bị lỗi mà hết hộp với hóa đơn thì còn bảo hành được không?"),
            _q("{device} trong đơn {order} bị lỗi, còn bảo hành không shop?"),
        ),
        (
            _q("thời hạn bảo hành cho {device} là mấy tháng?", "warranty_period"),
            _q("máy gửi trung tâm sửa thì chờ khoảng bao nhiêu ngày?", "warranty_processing"),
            _q("{device} rớt xuống sàn bể vỏ thì bên mình có sửa miễn phí không?", "warranty_exclusions"),
            _q("đóng gói {device} gửi về sửa thì em có phải trả cước không?", "warranty_shipping_free"),
            _q("may bi loi ky thuat thi duoc doi sua trong bao lau", "warranty_period", "warranty_processing"),
            _q("những trường hợp nào thì bị từ chối bảo hành vậy?", "warranty_exclusions"),
        ),
        Phrasing(
            (
                (
                    "Sản phẩm điện tử và đồ gia dụng được bảo hành {warranty_period} cho lỗi kỹ thuật, thời gian xử lý "
                    "{warranty_processing} làm việc ạ. Shop không bảo hành trường hợp {warranty_exclusions}, vào nước "
                    "hoặc tự ý sửa chữa."
                ),
                (
                    "Shop bảo hành {warranty_period} cho lỗi kỹ thuật và xử lý trong {warranty_processing} làm việc ạ. "
                    "Các trường hợp {warranty_exclusions}, vào nước, cháy nổ do nguồn điện hay tự ý sửa chữa không được "
                    "bảo hành."
                ),
                (
                    "Sản phẩm gặp lỗi kỹ thuật được bảo hành trong {warranty_period}, trung tâm xử lý từ "
                    "{warranty_processing} làm việc ạ. Sản phẩm bị {warranty_exclusions}, vào nước hoặc đã tự ý sửa "
                    "chữa sẽ không được bảo hành."
                ),
            ),
            (
                (
                    ("warranty_shipping_free",),
                    "Shop {warranty_shipping_free} khi bạn gửi sản phẩm đi bảo hành.",
                ),
            ),
        ),
    ),
    TopicSpec(
        "payment_methods",
        (
            _q("shop có những phương thức thanh toán nào?"),
            _q("mình có thể thanh toán khi nhận hàng không?"),
            _q("shop có nhận thanh toán bằng ví MoMo không?"),
            _q("mình muốn trả bằng thẻ Visa thì có được không?"),
            _q("đơn {amount} có thanh toán COD được không?", "cod_limit"),
            _q("thanh toán đơn hàng bằng cách nào vậy?"),
            _q("có trả qua ZaloPay được không shop?"),
            _q("mua {product} giá {amount} thì chuyển khoản hay COD tiện hơn?", "cod_limit"),
            _q("tt bằng thẻ Mastercard đc ko ad?"),
            _q("shop co nhan chuyen khoan khong"),
            _q("tôi muốn hỏi các hình thức thanh toán mà cửa hàng chấp nhận."),
            _q("đơn trên 10 triệu có cho nhận hàng rồi mới trả tiền không?", "cod_limit"),
            _q("mình trả tiền mặt lúc nhận hàng được không?"),
            _q("shop có nhận chuyển khoản ngân hàng không?"),
            _q("chuyển khoản thì ghi nội dung gì vậy shop?"),
            _q("thanh toán bằng thẻ ghi nợ được không?"),
            _q("mình không có thẻ ngân hàng, trả tiền kiểu gì được?"),
            _q("đơn {amount} phải trả trước hay nhận hàng rồi trả?", "cod_limit"),
            _q("đơn 15 triệu có ship COD được không?", "cod_limit"),
            _q("shop có cho trả tiền sau khi nhận hàng không?"),
            _q("thanh toán online được những cách nào ạ?"),
            _q("quét mã QR bằng MoMo được không ad?"),
            _q("ví nào thanh toán được ở shop vậy?"),
            _q("mình thanh toán bằng Visa cho đơn {order} được không?"),
            _q("có phải trả trước 20% không shop?", "cod_limit"),
            _q("thanh toan bang the tin dung duoc ko"),
            _q("có cần thanh toán trước không hay COD hết được?", "cod_limit"),
            _q("pay bằng Mastercard được hông shop?"),
            _q("shop nhận những loại thẻ nào?"),
            _q("mua {product} giá {amount} trả bằng ví MoMo được chứ?"),
            _q("ship COD toàn quốc không shop?"),
            _q("đơn {order} muốn đổi từ COD sang chuyển khoản được không?"),
            _q("có trả tiền mặt trực tiếp được không hay bắt buộc online?"),
            _q("đơn được freeship thì có trả bằng thẻ Visa được không?"),
            _q("trả tiền bằng thẻ ATM nội địa được không shop?"),
            _q("đơn {amount} mà nhận hàng mới trả tiền thì có được không?", "cod_limit"),
            _q("đơn {order} chuyển khoản rồi thì có cần báo lại cho shop không?"),
            _q("shop có nhận thanh toán qua ví điện tử như MoMo, ZaloPay không?"),
            _q("shop có chấp nhận thẻ quốc tế không?"),
            _q("trả tiền bằng internet banking được không?"),
        ),
        (
            _q("bên mình chấp nhận những kiểu trả tiền nào vậy?", "pay_cod", "pay_bank_transfer", "pay_card"),
            _q("em dùng ví điện tử thì có thanh toán được không nhỉ?", "pay_ewallet"),
            _q("đơn {amount} mà muốn đưa tiền mặt cho shipper thì có được không?", "pay_cod", "cod_limit"),
            _q("quẹt thẻ quốc tế lúc đặt hàng có hỗ trợ không?", "pay_card"),
            _q("tra tien qua ngan hang duoc khong", "pay_bank_transfer"),
            _q("hóa đơn mười hai triệu thì có được giao hàng trước rồi mới trả tiền?", "cod_limit"),
        ),
        Phrasing(
            (
                (
                    "Shop nhận thanh toán khi nhận hàng ({pay_cod}), {pay_bank_transfer} ngân hàng, thẻ {pay_card} và "
                    "ví điện tử {pay_ewallet} ạ. Bạn chọn phương thức ở bước thanh toán khi đặt hàng."
                ),
                (
                    "Bạn có thể thanh toán bằng {pay_cod}, {pay_bank_transfer} ngân hàng, thẻ {pay_card} hoặc ví "
                    "{pay_ewallet} ạ. Tất cả phương thức đều được chọn ở bước thanh toán."
                ),
                (
                    "Hiện shop hỗ trợ {pay_cod}, {pay_bank_transfer}, thẻ {pay_card} và ví điện tử {pay_ewallet} ạ. "
                    "Bạn chọn cách phù hợp ở bước cuối khi đặt hàng nhé."
                ),
            ),
            (
                (
                    ("cod_limit",),
                    (
                        "{pay_cod} áp dụng cho đơn dưới {cod_limit}; đơn từ {cod_limit} trở lên cần thanh toán trước "
                        "20% giá trị đơn."
                    ),
                ),
            ),
        ),
    ),
    TopicSpec(
        "installment",
        (
            _q("shop có hỗ trợ trả góp không?"),
            _q("mua {product} giá {amount} có trả góp được không?"),
            _q("trả góp cần điều kiện gì vậy shop?"),
            _q("trả góp có mất lãi không?"),
            _q("mình muốn trả góp 6 tháng được không?"),
            _q("đơn bao nhiêu tiền thì được trả góp?"),
            _q("tra gop qua the tin dung duoc khong shop"),
            _q("tôi không có thẻ tín dụng thì có trả góp được không?"),
            _q("góp 12 tháng lãi suất bao nhiêu ạ?"),
            _q("cho hỏi đơn {amount} có chia kỳ thanh toán được không?"),
            _q("em muốn mua {product} trả góp, thủ tục thế nào ạ?"),
            _q("mua {product} trả góp 0% được không?"),
            _q("trả góp được mấy tháng vậy shop?"),
            _q("đơn {amount} trả góp được không?"),
            _q("góp qua thẻ ghi nợ được không?"),
            _q("trả góp có mất phí chuyển đổi không?"),
            _q("tôi muốn mua trả góp qua công ty tài chính được không?"),
            _q("chia làm 3 kỳ thanh toán được không shop?"),
            _q("trả góp 12 tháng có bị tính lãi không?"),
            _q("mua góp cần giấy tờ gì không?"),
            _q("trả góp bằng thẻ Visa của ngân hàng nào?"),
            _q("đơn dưới 3 triệu có trả góp được không?"),
            _q("trả dần hàng tháng được không ad?"),
            _q("tra gop 0% ko shop"),
            _q("mua {product} {amount} muốn góp 6 tháng thì sao?"),
            _q("thẻ tín dụng Mastercard trả góp được không?"),
            _q("lãi suất trả góp bao nhiêu?"),
            _q("có hỗ trợ trả chậm không shop?"),
            _q("mua trước trả sau được không?"),
            _q("đơn {order} muốn chuyển sang trả góp được không?"),
            _q("tra gop can the gi vay"),
            _q("trả góp có phí ẩn gì không?"),
            _q("em là sinh viên không có thẻ tín dụng, mua góp được không?"),
            _q("tối thiểu bao nhiêu tiền mới được trả góp?"),
            _q("chọn trả góp ở bước nào khi đặt hàng?"),
            _q("trả góp có được miễn phí chuyển đổi không shop?"),
            _q("đơn {order} giá {amount}, góp 12 tháng được không?"),
        ),
        (
            _q(
                "em định mua {product} nhưng muốn chia nhỏ tiền ra trả dần, bên mình có cho không?",
                "installment_card",
                "installment_minimum",
            ),
            _q("giá trị đơn tối thiểu để mua góp là bao nhiêu?", "installment_minimum"),
            _q("mua góp ở đây có bị cộng thêm tiền lãi không?", "installment_zero_interest"),
            _q("các kỳ hạn góp bên mình gồm những mốc nào?", "installment_terms"),
            _q("mua gop thi can dung loai the nao", "installment_card"),
            _q(
                "hóa đơn {amount} có đủ điều kiện góp không lãi không?",
                "installment_minimum",
                "installment_zero_interest",
            ),
        ),
        Phrasing(
            (
                (
                    "Shop hỗ trợ trả góp {installment_zero_interest} qua {installment_card} cho đơn từ "
                    "{installment_minimum} ạ. Bạn chọn kỳ hạn {installment_terms} ở bước thanh toán."
                ),
                (
                    "Đơn từ {installment_minimum} được trả góp qua {installment_card} với {installment_zero_interest} "
                    "ạ. Kỳ hạn trả góp là {installment_terms}."
                ),
                (
                    "Bạn có thể trả góp {installment_zero_interest}, kỳ hạn {installment_terms}, nếu đơn từ "
                    "{installment_minimum} và thanh toán bằng {installment_card} ạ."
                ),
            ),
        ),
    ),
    TopicSpec(
        "discount_code",
        (
            _q("mã giảm giá {code} dùng thế nào?"),
            _q("sao mình nhập mã {code} mà không được?", "no_flash_sale"),
            _q("nhập mã giảm giá ở đâu vậy shop?"),
            _q("một đơn hàng dùng được mấy mã giảm giá?"),
            _q("mình dùng cùng lúc mã {code} và mã {code2} được không?"),
            _q("khách mới mua lần đầu có mã giảm giá không?", *FIRST_ORDER),
            _q("mã KHACHMOI giảm bao nhiêu vậy shop?", *FIRST_ORDER),
            _q("đơn {amount} có dùng được mã KHACHMOI không?", *FIRST_ORDER),
            _q("mã {code} có áp dụng cho hàng flash sale không?", "no_flash_sale"),
            _q("ma {code} nhap o dau v shop"),
            _q("lần đầu mua ở shop thì được ưu đãi gì?", *FIRST_ORDER),
            _q("tôi có mã {code}, dùng cho {product} được không?"),
            _q("sp flash sale có áp mã đc ko ạ?", "no_flash_sale"),
            _q("mã {code} báo không hợp lệ là sao ad?", "no_flash_sale"),
            _q("mã giảm giá nhập ở bước nào vậy?"),
            _q("có mã giảm giá nào cho đơn {amount} không?"),
            _q("voucher {code} dùng được cho đơn {order} không?"),
            _q("sao áp mã {code} không được vậy ad?", "no_flash_sale"),
            _q("một đơn áp được 2 voucher không?"),
            _q("mã freeship với mã giảm giá dùng chung được không?"),
            _q("khách hàng mới có ưu đãi gì không shop?", *FIRST_ORDER),
            _q("mã KHACHMOI áp dụng cho đơn tối thiểu bao nhiêu?", *FIRST_ORDER),
            _q("nhập code ở đâu vậy shop?"),
            _q("có voucher giảm giá không shop?"),
            _q("hàng flash sale dùng voucher được không?", "no_flash_sale"),
            _q("ma giam gia nhap o dau vay ad"),
            _q("mình quên nhập mã {code} cho đơn {order}, giờ áp lại được không?"),
            _q("mã {code} hết hạn chưa shop?", "no_flash_sale"),
            _q("mã giảm {amount} dùng cho sản phẩm sale được không?", "no_flash_sale"),
            _q("dùng mã {code} cho đơn {amount} được giảm bao nhiêu?"),
            _q("lần đầu mua hàng nhập mã gì để được giảm?", *FIRST_ORDER),
            _q("có code giảm giá cho người mới không ạ?", *FIRST_ORDER),
            _q("áp 2 mã cùng lúc được hông ad"),
            _q("nhập mã xong không thấy trừ tiền là sao?", "no_flash_sale"),
            _q("có mã giảm phí ship không shop?"),
            _q("mã {code} với KHACHMOI dùng chung được không?", *FIRST_ORDER),
            _q("mua {product} giá {amount} có mã nào giảm thêm không?"),
        ),
        (
            _q("tài khoản mới tạo thì đơn đầu tiên được giảm bao nhiêu?", "first_order_code", "first_order_discount"),
            _q("code KHACHMOI có yêu cầu giá trị đơn tối thiểu không?", "first_order_minimum"),
            _q("em gộp hai voucher vào chung một đơn được chứ?", "one_code_per_order"),
            _q("ô để điền voucher nằm ở chỗ nào trên web?", "code_entry"),
            _q("mấy món đang giảm sốc giờ vàng thì có cộng thêm voucher được không?", "no_flash_sale"),
            _q("nhap voucher {code} ma bi bao loi, co phai do hang dang sale khong", "no_flash_sale"),
            _q(
                "đơn đầu tiên {amount} thì có được dùng mã chào mừng không?",
                "first_order_code",
                "first_order_minimum",
            ),
        ),
        Phrasing(
            (
                (
                    'Bạn nhập mã ở ô "Mã giảm giá" tại {code_entry} ạ, số tiền giảm hiện ngay khi mã hợp lệ. '
                    "Mỗi đơn hàng chỉ áp dụng {one_code_per_order}."
                ),
                (
                    'Mỗi đơn hàng chỉ dùng được {one_code_per_order} ạ. Bạn nhập mã ở ô "Mã giảm giá" tại '
                    "{code_entry}, hệ thống tự trừ tiền nếu mã hợp lệ."
                ),
                (
                    'Mã được nhập tại {code_entry}, ở ô "Mã giảm giá" ạ. Lưu ý mỗi đơn chỉ áp dụng '
                    "{one_code_per_order}, không cộng dồn nhiều mã."
                ),
            ),
            (
                (
                    FIRST_ORDER,
                    (
                        "Khách mua lần đầu nhập mã {first_order_code} để được giảm {first_order_discount} cho đơn từ "
                        "{first_order_minimum}."
                    ),
                ),
                (
                    ("no_flash_sale",),
                    "Mã không áp dụng cho sản phẩm {no_flash_sale}, bạn kiểm tra thêm hạn dùng của mã nhé.",
                ),
            ),
        ),
    ),
    TopicSpec(
        "contact",
        (
            _q("số hotline của shop là gì?"),
            _q("mình muốn gọi tổng đài thì gọi số nào?"),
            _q("shop có email hỗ trợ không?"),
            _q("tổng đài làm việc mấy giờ vậy shop?"),
            _q("tối {hour} giờ còn gọi hotline được không?"),
            _q("làm sao để liên hệ với nhân viên chăm sóc khách hàng?"),
            _q("cho xin sdt cskh với ad"),
            _q("so tong dai cua shop la bao nhieu"),
            _q("cuối tuần có ai trực tổng đài không?"),
            _q("tôi cần khiếu nại đơn {order}, liên hệ ở đâu?"),
            _q("mình gửi mail cho shop theo địa chỉ nào?"),
            _q("em cần gặp nhân viên gấp về đơn {order}, gọi số nào ạ?"),
            _q("số điện thoại cskh của shop là gì?"),
            _q("hotline của shop gọi giờ nào thì có người nghe?"),
            _q("mình muốn phản hồi về dịch vụ thì liên hệ ai?"),
            _q("email cskh là gì vậy?"),
            _q("sáng {hour} giờ gọi tổng đài có ai nghe chưa?"),
            _q("ngày lễ tổng đài có làm việc không?"),
            _q("đơn {order} có vấn đề, mình muốn gặp nhân viên hỗ trợ."),
            _q("shop có số nào để nhắn tin hay gọi không?"),
            _q("cho mình số hotline với."),
            _q("hotline bao nhiêu vậy ad?"),
            _q("mình mua đơn {amount} có chút vấn đề, liên hệ shop qua kênh nào?"),
            _q("lien he shop qua dau vay"),
            _q("sdt shop la gi"),
            _q("mình gọi hotline mãi không ai bắt máy, còn cách nào khác không?"),
            _q("shop trả lời email trong bao lâu?"),
            _q("muốn khiếu nại về shipper thì báo ai?"),
            _q("cskh làm việc đến mấy giờ?"),
            _q("tổng đài có hỗ trợ chủ nhật không?"),
            _q("mình cần tư vấn mua {product}, gọi số nào?"),
            _q("số hotline hỗ trợ bảo hành là số nào?"),
            _q("gửi ảnh sản phẩm lỗi cho shop qua đâu?"),
            _q("làm sao để nói chuyện với người thật chứ không phải bot?"),
            _q("gọi tổng đài hỏi về hoàn tiền được không?"),
            _q("tối {hour} giờ mới đi làm về thì gọi cho ai hỗ trợ?"),
            _q("đơn {order} giao thiếu hàng, gọi tổng đài số mấy?"),
        ),
        (
            _q("em muốn nói chuyện trực tiếp với tư vấn viên, gọi vào đâu ạ?", "hotline"),
            _q("khung giờ nghe máy của đường dây nóng là từ mấy giờ?", "hotline_hours"),
            _q("địa chỉ thư điện tử để gửi phản ánh là gì?", "support_email"),
            _q("khieu nai ve kien {order} thi goi so may", "hotline"),
            _q("ngoài nhắn tin ở đây thì còn kênh nào để liên lạc với bên mình?", "hotline", "support_email"),
            _q("mười giờ đêm gọi cho bên mình có người bắt máy không?", "hotline_hours"),
        ),
        Phrasing(
            (
                (
                    "Bạn gọi hotline {hotline} ({hotline_hours} mỗi ngày, kể cả cuối tuần và ngày lễ) ạ. "
                    "Bạn cũng có thể gửi email tới {support_email}, shop phản hồi trong vòng 24 giờ."
                ),
                (
                    "Tổng đài {hotline} hoạt động {hotline_hours} tất cả các ngày trong tuần ạ. "
                    "Nếu cần gửi hình ảnh hay khiếu nại, bạn email tới {support_email} nhé."
                ),
                (
                    "Bạn liên hệ shop qua hotline {hotline} ({hotline_hours} hằng ngày) hoặc email {support_email} ạ. "
                    "{shop_name} luôn sẵn sàng hỗ trợ bạn."
                ),
            ),
        ),
    ),
    TopicSpec(
        "showroom",
        (
            _q("shop có cửa hàng ở đâu không?"),
            _q("showroom của shop mở cửa mấy giờ?"),
            _q("mình muốn qua xem {product} trực tiếp thì đến đâu?"),
            _q("địa chỉ showroom ở Hà Nội là gì vậy?"),
            _q("ở Sài Gòn shop có chỗ nào để xem hàng không?"),
            _q("đặt online rồi qua showroom lấy được không?", "showroom_pickup"),
            _q("chủ nhật showroom có mở cửa không shop?"),
            _q("dia chi shop o dau vay"),
            _q("tôi muốn đến cửa hàng thử {clothes}, cửa hàng mở đến mấy giờ?"),
            _q("em mua {product} trên web rồi ghé cửa hàng nhận được ko?", "showroom_pickup"),
            _q("shop có bán offline không, cho mình xin địa chỉ?"),
            _q("shop có cửa hàng ở Hà Nội không?"),
            _q("showroom TP.HCM nằm ở đường nào?"),
            _q("cửa hàng mở cửa đến mấy giờ tối?"),
            _q("mình sống tại {place}, showroom gần nhất ở đâu?"),
            _q("shop có chi nhánh nào không?"),
            _q("đặt online rồi ra cửa hàng lấy có mất phí ship không?", "showroom_pickup"),
            _q("có thể đến xem {product} trước khi mua không?"),
            _q("showroom có mở cửa ngày lễ không?"),
            _q("cuối tuần qua showroom xem {clothes} được không?"),
            _q("cửa hàng của shop ở Hàng Bài phải không?"),
            _q("mình mua online, nhận tại cửa hàng được không?", "showroom_pickup"),
            _q("showroom mo cua may gio"),
            _q("có store nào ở Quận 1 không shop?"),
            _q("tối 9 giờ còn qua cửa hàng được không?"),
            _q("muốn thử giày trực tiếp thì ghé đâu?"),
            _q("đơn {order} chọn nhận ở showroom thì bao giờ qua lấy được?", "showroom_pickup"),
            _q("ghé showroom mua trực tiếp có được không?"),
            _q("cửa hàng bên Hoàn Kiếm số mấy?"),
            _q("shop có bán trực tiếp không hay chỉ online?"),
            _q("xin địa chỉ showroom ạ"),
            _q("mua đơn {amount} rồi đến showroom lấy để khỏi mất tiền ship được không?", "showroom_pickup"),
            _q("showroom Sài Gòn mở từ mấy giờ sáng?"),
            _q("dia chi cua hang o HCM la gi"),
            _q("mình ở tỉnh, ra Hà Nội thì ghé shop ở đâu?"),
        ),
        (
            _q("bên mình có điểm bán trực tiếp nào ở TP.HCM không?", "showroom_hcm"),
            _q("tới tận nơi xem hàng ở Hà Nội thì ghé số nhà nào?", "showroom_hanoi"),
            _q("giờ giấc đón khách của cửa hàng thế nào ạ?", "showroom_hours"),
            _q("chot don tren app roi toi tiem tu lay hang duoc khong", "showroom_pickup"),
            _q("em muốn ghé ngắm {product} tận mắt, hai chi nhánh nằm ở đâu?", "showroom_hanoi", "showroom_hcm"),
            _q("chín rưỡi tối qua xem đồ thì còn kịp không?", "showroom_hours"),
        ),
        Phrasing(
            (
                (
                    "Shop có showroom tại số {showroom_hanoi}, quận Hoàn Kiếm, Hà Nội và số {showroom_hcm}, Quận 1, "
                    "TP.HCM ạ. Cả hai showroom mở cửa {showroom_hours} tất cả các ngày trong tuần."
                ),
                (
                    "Bạn có thể ghé showroom {showroom_hanoi}, Hoàn Kiếm, Hà Nội hoặc {showroom_hcm}, Quận 1, TP.HCM ạ. "
                    "Showroom mở cửa {showroom_hours} hằng ngày, kể cả cuối tuần."
                ),
            ),
            (
                (
                    ("showroom_pickup",),
                    "Bạn cũng có thể đặt online rồi chọn {showroom_pickup} khi thanh toán, không mất phí giao hàng.",
                ),
            ),
        ),
    ),
)

DEMO_QUESTIONS = (
    ("order_tracking", "Chào shop, đơn hàng DH735102 của mình đang ở đâu rồi?"),
    ("return_policy", "Chính sách đổi trả của shop thế nào?"),
    ("payment_methods", "Shop có những phương thức thanh toán nào?"),
    ("discount_code", "Mã giảm giá KHACHMOI dùng thế nào?"),
    ("warranty", "Chính sách bảo hành của shop thế nào?"),
    ("late_delivery", "Sao đơn của mình giao trễ vậy shop?"),
    ("size_exchange", "Đổi size áo thun thế nào vậy shop?"),
    ("delivery_time", "Mình ở Đà Nẵng, đặt hôm nay thì bao lâu nhận được hàng?"),
    ("shipping_fee", "Phí ship của shop là bao nhiêu?"),
    ("installment", "Shop có hỗ trợ trả góp không?"),
    ("order_cancellation", "Làm sao để hủy đơn hàng vậy shop?"),
    ("contact", "Số hotline của shop là gì?"),
    ("showroom", "Showroom của shop mở cửa mấy giờ?"),
)


# --- the card -------------------------------------------------------------------------------


def load_card(path: Path = CARD_FILE) -> Card:
    """Read `shop_card.json` into facts in card order (topic by topic)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    facts = tuple(
        Fact(
            id=fact["id"],
            topic=topic["id"],
            statement=fact["statement"],
            alternatives=tuple(fact["alternatives"]),
            core=bool(fact["core"]),
            places=tuple(fact.get("places", ())),
        )
        for topic in data["topics"]
        for fact in topic["facts"]
    )
    return Card(data["shop"]["name"], tuple(topic["id"] for topic in data["topics"]), facts)


# --- text helpers ---------------------------------------------------------------------------


def question_key(text: str) -> str:
    """NFC, casefolded, Unicode punctuation as spaces, whitespace collapsed (as `student dataset check`)."""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    spaced = "".join(" " if unicodedata.category(char).startswith("P") else char for char in folded)
    return " ".join(spaced.split())


def strip_accents(text: str) -> str:
    """Vietnamese typed without diacritics: "Đơn hàng" -> "Don hang"."""
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    return unicodedata.normalize("NFC", "".join(char for char in decomposed if not unicodedata.combining(char)))


def word_ngrams(text: str, size: int = HELD_OUT_NGRAM) -> set[tuple[str, ...]]:
    """Runs of `size` words of the question, with and without its diacritics."""
    grams: set[tuple[str, ...]] = set()
    for form in (question_key(text), question_key(strip_accents(text))):
        words = form.split()
        grams.update(tuple(words[start : start + size]) for start in range(len(words) - size + 1))
    return grams


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _decapitalise(text: str) -> str:
    """Lower-case the first letter after "Dạ, " unless it starts an acronym or a code ("COD", "TP.HCM")."""
    if len(text) > 1 and text[1].islower():
        return text[:1].lower() + text[1:]
    return text


# --- questions ------------------------------------------------------------------------------


def _amount_vnd(rng: random.Random) -> str:
    """A price as Vietnamese customers write it: "1.250.000đ", "850k" or "3 triệu"."""
    thousands = rng.randrange(100, 15000, 50)
    style = rng.randrange(3)
    if style == 1 and thousands < 1000:
        return f"{thousands}k"
    if style == 2 and thousands % 1000 == 0:
        return f"{thousands // 1000} triệu"
    return f"{thousands * 1000:,}đ".replace(",", ".")


def draw_slots(rng: random.Random, orders: tuple[int, int], places: Sequence[str]) -> dict[str, str]:
    """Values for every slot a template may use; all are drawn, in a fixed order, for determinism."""
    clothes = rng.choice(CLOTHES)
    size, size2 = rng.sample(SHOE_SIZES if clothes in SHOES else LETTER_SIZES, 2)
    code, code2 = rng.sample(CODES, 2)
    return {
        "order": f"DH{rng.randint(*orders)}",
        "product": rng.choice(PRODUCTS),
        "device": rng.choice(DEVICES),
        "clothes": clothes,
        "size": size,
        "size2": size2,
        "amount": _amount_vnd(rng),
        "code": code,
        "code2": code2,
        "days": rng.choice(DAYS),
        "hour": rng.choice(HOURS),
        "place": rng.choice(places),
    }


def render_question(template: str, slots: Slots, opener: str, unaccented: bool) -> str:
    """The customer's message: an optional greeting and the filled template, all of it without diacritics
    when `unaccented` or when the template itself is written without them."""
    body = template.format_map(slots)
    text = opener + body if opener and not body.startswith(("cho ", "xin ")) else _capitalise(body)
    return strip_accents(text) if unaccented or strip_accents(template) == template else text


# --- answers --------------------------------------------------------------------------------


def facts_asked(question: Question, slots: Slots, card: Card) -> tuple[str, ...]:
    """The fact ids the question asks about, with the region markers resolved for its {place}."""
    resolved: list[str] = []
    for ask in question.asks:
        if ask == REGION:
            resolved.append(card.region_of(slots["place"]))
        elif ask == ALL_REGIONS:
            resolved.extend(card.region_facts())
        else:
            resolved.append(ask)
    return tuple(dict.fromkeys(resolved))


def _extra_sentences(extras: Sequence[tuple[tuple[str, ...], str]], wanted: set[str]) -> list[str]:
    """The extra sentences that state the `wanted` facts, in their listed order: first those whose whole
    group is wanted, then those that cover a fact still missing (stating the rest of their group too)."""
    chosen: set[int] = set()
    covered: set[str] = set()
    for whole_group_only in (True, False):
        for index, (facts, _) in enumerate(extras):
            missing = wanted & set(facts) - covered
            if index not in chosen and missing and (set(facts) <= wanted or not whole_group_only):
                chosen.add(index)
                covered |= set(facts)
    return [sentence for index, (_, sentence) in enumerate(extras) if index in chosen]


def compose_answer(spec: TopicSpec, asked: Iterable[str], card: Card, variant: int) -> str:
    """ "Dạ, " + the lead phrasing `variant` (core facts) and one sentence per asked group of facts."""
    values = card.values()
    wanted = set(asked) - set(card.core(spec.name))
    lead = spec.answers.leads[variant % len(spec.answers.leads)].format_map(values)
    extras = [sentence.format_map(values) for sentence in _extra_sentences(spec.answers.extras, wanted)]
    parts = [*extras, lead] if spec.answers.extras_first else [lead, *extras]
    return "Dạ, " + _decapitalise(" ".join(parts))


def _chat(user: str, assistant: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


# --- the three files ------------------------------------------------------------------------


def _draw_unique(draw: Callable[[], tuple[str, ...]], accept: Callable[[str], bool]) -> tuple[str, ...]:
    """Call `draw` until `accept` takes the question (its first element); fail loudly after MAX_TRIES."""
    for _ in range(MAX_TRIES):
        drawn = draw()
        if accept(drawn[0]):
            return drawn
    raise RuntimeError(f"no acceptable question after {MAX_TRIES} draws; the last was {drawn[0]!r}")


def build_chats(rng: random.Random, card: Card | None = None) -> list[dict[str, object]]:
    """TRAIN_PER_TOPIC chats per topic, no two with the same normalised question, in a seeded shuffle."""
    card = card or load_card()
    places = card.places()
    seen: set[str] = set()
    samples: list[dict[str, object]] = []

    def accept(question: str) -> bool:
        key = question_key(question)
        if key in seen:
            return False
        seen.add(key)
        return True

    for spec in TOPICS:
        for _ in range(TRAIN_PER_TOPIC):

            def draw(spec: TopicSpec = spec) -> tuple[str, ...]:
                template = rng.choice(spec.train)
                slots = draw_slots(rng, TRAIN_ORDERS, places)
                unaccented = rng.random() < UNACCENTED_SHARE
                user = render_question(template.text, slots, rng.choice(TRAIN_OPENERS), unaccented)
                asked = card.core(spec.name) + facts_asked(template, slots, card)
                return user, compose_answer(spec, asked, card, rng.randrange(len(spec.answers.leads)))

            user, answer = _draw_unique(draw, accept)
            samples.append({"messages": _chat(user, answer), "topic": spec.name, "task": TASK})
    rng.shuffle(samples)
    return samples


def build_eval_set(
    chats: Sequence[Mapping[str, object]], rng: random.Random, card: Card | None = None
) -> list[dict[str, object]]:
    """EVAL_PER_TOPIC held-out items per topic, cycling through its held-out templates and the regions.

    A drawn question is redrawn when it repeats a question or shares a run of HELD_OUT_NGRAM words
    (with or without diacritics) with any training question.
    """
    card = card or load_card()
    train_questions = [str(chat["messages"][1]["content"]) for chat in chats]  # type: ignore[index]  # messages: role/content dicts
    seen = {question_key(question) for question in train_questions}
    train_grams = set().union(*(word_ngrams(question) for question in train_questions))
    items: list[dict[str, object]] = []

    def accept(question: str) -> bool:
        key = question_key(question)
        if key in seen or word_ngrams(question) & train_grams:
            return False
        seen.add(key)
        return True

    regions = [card.fact(fact_id).places for fact_id in card.region_facts()]
    for spec in TOPICS:
        for index in range(EVAL_PER_TOPIC):
            template = spec.held_out[index % len(spec.held_out)]
            places = regions[index % len(regions)]  # every region gets place questions

            def draw(template: Question = template, places: Sequence[str] = places) -> tuple[str, ...]:
                slots = draw_slots(rng, EVAL_ORDERS, places)
                unaccented = rng.random() < UNACCENTED_SHARE
                user = render_question(template.text, slots, rng.choice(EVAL_OPENERS), unaccented)
                return (user, *facts_asked(template, slots, card))

            user, *fact_ids = _draw_unique(draw, accept)
            reference = compose_answer(spec, card.core(spec.name) + tuple(fact_ids), card, variant=0)
            items.append(
                {
                    "id": f"{spec.name}-{index + 1:02d}",
                    "topic": spec.name,
                    "messages": _chat(user, None),
                    "facts": [list(card.fact(fact_id).alternatives) for fact_id in fact_ids],
                    "fact_ids": fact_ids,
                    "reference": reference,
                }
            )
    return items


def build_demo_prompts() -> list[dict[str, object]]:
    """One fixed question per topic, phrased like the training data, without an answer."""
    return [{"messages": _chat(question, None), "topic": topic, "task": TASK} for topic, question in DEMO_QUESTIONS]


def write_jsonl(rows: Iterable[Mapping[str, object]], path: Path) -> None:
    lines = (json.dumps(row, ensure_ascii=False) for row in rows)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")


def main(out_dir: Path = DATA_DIR) -> None:
    """Write the three files into `out_dir` (created if needed) from the card next to this script."""
    out_dir.mkdir(parents=True, exist_ok=True)
    card = load_card()
    chats = build_chats(random.Random(TRAIN_SEED), card)
    write_jsonl(chats, out_dir / CHATS_FILE)
    write_jsonl(build_demo_prompts(), out_dir / PROMPTS_FILE)
    write_jsonl(build_eval_set(chats, random.Random(EVAL_SEED), card), out_dir / EVAL_FILE)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA_DIR)
