"""Generated customers for the customers benchmark: persons and organisations with Persian and
Latin names (Persian names sometimes typed with Arabic letters), Iranian cities, E.164 mobiles,
e-mails, national ids, addresses, tags and acquisition sources, spread over three years.

Rows are produced in create_time order (as a live system inserts them), deterministic for a
seed, with the values customer-svc itself would store: `domain.display_name` and
`domain.search_key` are the service's own functions.
"""

from __future__ import annotations

import datetime as dt
import random
import unicodedata
from collections.abc import Iterator

from psycopg.types.json import Jsonb

from crm_chassis import persian
from customer_svc import domain

PERSON, ORGANIZATION = domain.PERSON, domain.ORGANIZATION

# (Persian, Latin) given names: male, female, then compounds.
_GIVEN = """
محمد:Mohammad علی:Ali حسین:Hossein رضا:Reza مهدی:Mehdi امیر:Amir حسن:Hassan سعید:Saeed
مجید:Majid حمید:Hamid احمد:Ahmad جواد:Javad مصطفی:Mostafa ابوالفضل:Abolfazl امید:Omid
وحید:Vahid مرتضی:Morteza مسعود:Masoud سجاد:Sajjad محسن:Mohsen عباس:Abbas یوسف:Yousef
ابراهیم:Ebrahim اسماعیل:Esmaeil کاظم:Kazem هادی:Hadi بهزاد:Behzad بهرام:Bahram فرهاد:Farhad
فرزاد:Farzad کامران:Kamran کیوان:Keyvan پویا:Pouya پدرام:Pedram آرش:Arash آرمان:Arman
بابک:Babak داریوش:Dariush سیاوش:Siavash کوروش:Kourosh شهرام:Shahram شهریار:Shahriar
مازیار:Maziar نیما:Nima پارسا:Parsa سینا:Sina سامان:Saman سروش:Soroush رامین:Ramin
میلاد:Milad ایمان:Iman عرفان:Erfan یاسین:Yasin طاها:Taha امین:Amin هومن:Houman بردیا:Bardia
کیان:Kian آرین:Arian اکبر:Akbar اصغر:Asghar قاسم:Ghasem ناصر:Naser منصور:Mansour
جمشید:Jamshid فریدون:Fereydoun بیژن:Bijan خسرو:Khosrow هوشنگ:Houshang منوچهر:Manouchehr
ایرج:Iraj نادر:Nader یاسر:Yaser صادق:Sadegh باقر:Bagher جعفر:Jafar مهران:Mehran
مهرداد:Mehrdad کیارش:Kiarash فرشید:Farshid شاهین:Shahin رسول:Rasoul نوید:Navid کاوه:Kaveh
فاطمه:Fatemeh زهرا:Zahra مریم:Maryam معصومه:Masoumeh زینب:Zeynab سمیه:Somayeh سارا:Sara
نرگس:Narges لیلا:Leila الهام:Elham الناز:Elnaz مینا:Mina مهسا:Mahsa مهناز:Mahnaz
مهتاب:Mahtab نازنین:Nazanin نگار:Negar نیلوفر:Niloufar شیما:Shima شیرین:Shirin پریسا:Parisa
پروانه:Parvaneh پریا:Paria ترانه:Taraneh تینا:Tina آزاده:Azadeh آناهیتا:Anahita آیدا:Aida
آتنا:Atena آرزو:Arezoo اعظم:Azam اکرم:Akram بهاره:Bahareh بهناز:Behnaz بیتا:Bita
حدیث:Hadis حمیده:Hamideh خدیجه:Khadijeh راضیه:Razieh رویا:Roya ریحانه:Reyhaneh ژاله:Jaleh
سحر:Sahar سمانه:Samaneh سمیرا:Samira سپیده:Sepideh ستاره:Setareh سوسن:Sousan سیما:Sima
شبنم:Shabnam شقایق:Shaghayegh شهلا:Shahla صدف:Sadaf طاهره:Tahereh عاطفه:Atefeh عسل:Asal
فرشته:Fereshteh فرزانه:Farzaneh فریبا:Fariba فرناز:Farnaz فهیمه:Fahimeh کبری:Kobra
کتایون:Katayoun کیمیا:Kimia گلاره:Gelareh گلناز:Golnaz لادن:Ladan لاله:Laleh
محبوبه:Mahboubeh مرضیه:Marzieh ملیکا:Melika منیژه:Manijeh مهدیه:Mahdieh مهرناز:Mehrnaz
میترا:Mitra نازیلا:Nazila ندا:Neda نسرین:Nasrin نسترن:Nastaran نفیسه:Nafiseh نوشین:Noushin
هانیه:Hanieh هدیه:Hedieh هستی:Hasti یاسمن:Yasaman یگانه:Yeganeh یلدا:Yalda رعنا:Rana
ساناز:Sanaz سولماز:Solmaz پگاه:Pegah غزاله:Ghazaleh فائزه:Faezeh کوثر:Kowsar محدثه:Mohaddeseh
محمدرضا:Mohammadreza علیرضا:Alireza حمیدرضا:Hamidreza غلامرضا:Gholamreza امیرحسین:Amirhossein
محمدحسین:Mohammadhossein محمدعلی:Mohammadali محمدمهدی:Mohammadmehdi محمدجواد:Mohammadjavad
امیرعلی:Amirali ابوالقاسم:Abolghasem روح‌الله:Rouhollah حبیب‌الله:Habibollah
نصرالله:Nasrollah عبدالله:Abdollah سیدعلی:Seyedali فاطمه‌زهرا:Fatemehzahra
"""

# (Persian, Latin) family names; compounds below bring them to ~300.
_FAMILY = """
محمدی:Mohammadi حسینی:Hosseini احمدی:Ahmadi رضایی:Rezaei موسوی:Mousavi کریمی:Karimi
جعفری:Jafari رحیمی:Rahimi صادقی:Sadeghi قاسمی:Ghasemi کاظمی:Kazemi مرادی:Moradi
ابراهیمی:Ebrahimi حیدری:Heidari هاشمی:Hashemi عباسی:Abbasi زارعی:Zarei نوری:Nouri
اکبری:Akbari محمودی:Mahmoudi یوسفی:Yousefi سلیمانی:Soleimani نجفی:Najafi طاهری:Taheri
شریفی:Sharifi بابایی:Babaei قربانی:Ghorbani میرزایی:Mirzaei ملکی:Maleki نظری:Nazari
عزیزی:Azizi کرمی:Karami امیری:Amiri رستمی:Rostami خسروی:Khosravi فرهادی:Farhadi
سعیدی:Saeedi اسدی:Asadi رحمانی:Rahmani صالحی:Salehi منصوری:Mansouri جلالی:Jalali
بهرامی:Bahrami شجاعی:Shojaei توکلی:Tavakoli تقوی:Taghavi نصیری:Nasiri فتحی:Fathi
باقری:Bagheri شیرازی:Shirazi تهرانی:Tehrani اصفهانی:Esfahani کرمانی:Kermani یزدی:Yazdi
تبریزی:Tabrizi قزوینی:Ghazvini رشتی:Rashti کاشانی:Kashani خراسانی:Khorasani همدانی:Hamedani
بختیاری:Bakhtiari افشار:Afshar فراهانی:Farahani گلپایگانی:Golpayegani دهقان:Dehghan
کشاورز:Keshavarz آهنگر:Ahangar نجار:Najjar خیاط:Khayyat زرگر:Zargar عطار:Attar صراف:Sarraf
مقدم:Moghaddam صدری:Sadri وحیدی:Vahidi مجیدی:Majidi پاکزاد:Pakzad فرهمند:Farahmand
دانشور:Daneshvar روشن:Roshan سپهری:Sepehri آریا:Arya بهمنی:Bahmani اسفندیاری:Esfandiari
شاهرخی:Shahrokhi کیانی:Kiani آذری:Azari ثابتی:Sabeti نیکخواه:Nikkhah پورمحمدی:Pourmohammadi
میرحسینی:Mirhosseini شکوهی:Shokouhi قنبری:Ghanbari یعقوبی:Yaghoubi خلیلی:Khalili
اسلامی:Eslami رنجبر:Ranjbar غفاری:Ghaffari مهاجر:Mohajer سلطانی:Soltani کامرانی:Kamrani
نادری:Naderi فرجی:Faraji ولی‌پور:Valipour حاتمی:Hatami شاکری:Shakeri عسگری:Asgari
"""
_FAMILY_ROOTS = """
علی:Ali حسن:Hassan رضا:Reza کریم:Karim رحیم:Rahim اکبر:Akbar جعفر:Jafar قاسم:Ghasem
حیدر:Heidar عباس:Abbas محمد:Mohammad ابراهیم:Ebrahim یوسف:Yousef نصر:Nasr امین:Amin
صادق:Sadegh باقر:Bagher تقی:Taghi نقی:Naghi کاظم:Kazem مهدی:Mehdi نجف:Najaf
سلیمان:Soleiman اسماعیل:Esmaeil فرج:Faraj قلی:Gholi بهمن:Bahman شاه:Shah نیک:Nik
ملک:Malek امیر:Amir میر:Mir
"""
_FAMILY_SUFFIXES = [
    ("\u200cزاده", "zadeh"),
    ("پور", "pour"),
    ("\u200cنیا", "nia"),
    ("\u200cنژاد", "nejad"),
    ("\u200cفر", "far"),
    ("\u200cراد", "rad"),
    ("\u200cمهر", "mehr"),
]


# Latin-only names (customers abroad, foreign partners).
def _words(s: str) -> list[str]:
    return s.split()


_FOREIGN_GIVEN = _words(
    "John Maria David Anna Peter Laura Michael Elena Thomas Sofia Daniel Julia Martin Emma "
    "Lucas Olga Ivan Fatima Omar Leyla Hakan Ayşe Mehmet Yusuf Anton Chen Wei Hiroshi Priya Raj"
)
_FOREIGN_FAMILY = _words(
    "Smith Müller Rossi García Novak Schmidt Kowalski Petrov Ivanova Fischer Weber Dubois Martin "
    "Yılmaz Demir Kaya Haddad Khoury Nasser Wang Li Tanaka Sharma Patel Costa Silva Jansen"
)


def _pairs(block: str) -> list[tuple[str, str]]:
    out, seen = [], set()
    for item in block.split():
        fa, _, la = item.partition(":")
        if fa not in seen:
            seen.add(fa)
            out.append((fa, la))
    return out


GIVEN = _pairs(_GIVEN)
FAMILY = _pairs(_FAMILY)
_seen = {fa for fa, _ in FAMILY}
for _root_fa, _root_la in _pairs(_FAMILY_ROOTS):
    for _suf_fa, _suf_la in _FAMILY_SUFFIXES:
        _fa = _root_fa + _suf_fa
        if _fa not in _seen and len(FAMILY) < 300:
            _seen.add(_fa)
            FAMILY.append((_fa, _root_la + _suf_la))

# (Latin city, province, weight): the city list of the sales teams (a Tehran-heavy business).
CITIES = [
    ("Tehran", "Tehran", 0.55),
    ("Mashhad", "Razavi Khorasan", 0.06),
    ("Isfahan", "Isfahan", 0.05),
    ("Karaj", "Alborz", 0.05),
    ("Shiraz", "Fars", 0.04),
    ("Tabriz", "East Azerbaijan", 0.04),
    ("Qom", "Qom", 0.025),
    ("Ahvaz", "Khuzestan", 0.025),
    ("Kermanshah", "Kermanshah", 0.015),
    ("Rasht", "Gilan", 0.015),
    ("Kerman", "Kerman", 0.012),
    ("Urmia", "West Azerbaijan", 0.012),
    ("Yazd", "Yazd", 0.012),
    ("Hamadan", "Hamadan", 0.01),
    ("Arak", "Markazi", 0.01),
    ("Zahedan", "Sistan and Baluchestan", 0.008),
    ("Ardabil", "Ardabil", 0.008),
    ("Bandar Abbas", "Hormozgan", 0.008),
    ("Sari", "Mazandaran", 0.008),
    ("Gorgan", "Golestan", 0.007),
    ("Qazvin", "Qazvin", 0.007),
    ("Zanjan", "Zanjan", 0.006),
    ("Sanandaj", "Kurdistan", 0.006),
    ("Khorramabad", "Lorestan", 0.006),
    ("Bushehr", "Bushehr", 0.005),
    ("Kashan", "Isfahan", 0.005),
    ("Semnan", "Semnan", 0.004),
    ("Birjand", "South Khorasan", 0.004),
    ("Bojnurd", "North Khorasan", 0.004),
    ("Ilam", "Ilam", 0.003),
    ("Yasuj", "Kohgiluyeh and Boyer-Ahmad", 0.003),
    ("Shahrekord", "Chaharmahal and Bakhtiari", 0.003),
]
_CITY_CUM = []
_acc = 0.0
for _c in CITIES:
    _acc += _c[2]
    _CITY_CUM.append(_acc)

STREETS_FA = _words(
    "ولیعصر انقلاب آزادی شریعتی مطهری جمهوری طالقانی فاطمی کارگر پاسداران دماوند ستارخان "
    "نیاوران ونک سعادت‌آباد جردن امام‌خمینی بهشتی مدرس هفت‌تیر"
)
STREETS_LA = _words("Valiasr Enghelab Azadi Shariati Motahari Jomhouri Taleghani Fatemi Pasdaran Vanak Jordan")
SOURCES = [
    "website",
    "phone",
    "exhibition",
    "referral",
    "advertising",
    "social_telegram",
    "social_instagram",
    "social_whatsapp",
    "social_linkedin",
    "email_campaign",
    "sms_campaign",
    "walk_in",
    "sales_visit",
    "other",
]
_SOURCE_W = [18, 12, 8, 10, 6, 7, 12, 5, 3, 4, 4, 5, 4, 2]
TAGS = ["vip", "wholesale", "retail", "newsletter", "b2b", "partner", "مشتری ویژه", "عمده", "نمایشگاه ۱۴۰۲"]
MAIL_DOMAINS = ["gmail.com", "yahoo.com", "chmail.ir", "outlook.com", "hotmail.com", "mail.ir"]
MOBILE_PREFIXES = ["910", "911", "912", "913", "914", "915", "917", "919", "930", "933", "935", "936", "937", "938"]
MOBILE_PREFIXES += ["939", "901", "902", "903", "990", "991", "921", "922"]
AREA_CODES = {"Tehran": "21", "Mashhad": "51", "Isfahan": "31", "Karaj": "26", "Shiraz": "71", "Tabriz": "41"}
ORG_KINDS_FA = ["بازرگانی", "صنایع غذایی", "فناوری اطلاعات", "ساختمانی", "پخش", "تولیدی", "مهندسی", "حمل و نقل"]
ORG_KINDS_LA = ["Trading", "Food Industries", "Software", "Construction", "Distribution", "Manufacturing"]
ORG_BRANDS = [
    ("آرمان", "Arman"),
    ("پارس", "Pars"),
    ("سپهر", "Sepehr"),
    ("نوین", "Novin"),
    ("البرز", "Alborz"),
    ("دماوند", "Damavand"),
    ("کاوش", "Kavosh"),
    ("آتیه", "Atieh"),
    ("ایده‌پرداز", "Idepardaz"),
    ("مهر", "Mehr"),
    ("پیشگامان", "Pishgaman"),
    ("راهبر", "Rahbar"),
    ("آسیا", "Asia"),
    ("کیان", "Kian"),
    ("زاگرس", "Zagros"),
    ("خلیج فارس", "Persian Gulf"),
]
INDUSTRIES = ["retail", "food", "software", "construction", "logistics", "manufacturing", "healthcare", "education"]
OWNERS = [f"rep{i:02d}" for i in range(1, 41)]
_ARABIC = str.maketrans({"ی": "ي", "ک": "ك"})
_PERSIAN_DIGITS = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")

COLUMNS = (
    "customer_code",
    "type",
    "given_name",
    "family_name",
    "organization_name",
    "display_name",
    "email",
    "phone",
    "mobile",
    "acquisition_source",
    "create_time",
    "update_time",
    "gender",
    "country",
    "province",
    "city",
    "address",
    "postal_code",
    "national_id",
    "birth_date",
    "industry",
    "contact_persons",
    "lifecycle_stage",
    "acquisition_date",
    "owner",
    "tags",
    "search_text",
)


def _ascii(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()


def arabic_letters(s: str) -> str:
    """As typed on an Arabic keyboard: ي for ی, ك for ک."""
    return s.translate(_ARABIC)


def persian_digits(s: str) -> str:
    return s.translate(_PERSIAN_DIGITS)


def national_id(rnd: random.Random) -> str:
    """A valid Iranian national id (kod-e melli): nine digits and the mod-11 check digit."""
    d = [rnd.randrange(10) for _ in range(9)]
    if len(set(d)) == 1:
        d[0] = (d[0] + 1) % 10
    s = sum(d[i] * (10 - i) for i in range(9)) % 11
    return "".join(map(str, d)) + str(s if s < 2 else 11 - s)


def customer_code(n: int) -> str:
    """The code customer-svc gives its n-th customer ('C-' || lpad(n::text, 6, '0')); beyond
    999,999 that expression truncates, so rows past it get the full number instead."""
    return f"C-{n:06d}"


class Generator:
    """Deterministic rows for a seed; `rows(n, start, end)` yields COPY tuples in time order."""

    def __init__(self, seed: int = 20261123):
        self.rnd = random.Random(seed)

    def mobile(self) -> str:
        r = self.rnd
        return "+98" + r.choice(MOBILE_PREFIXES) + f"{r.randrange(10_000_000):07d}"

    def city(self) -> tuple[str, str]:
        x = self.rnd.random() * _acc
        for (city, province, _), cum in zip(CITIES, _CITY_CUM, strict=True):
            if x <= cum:
                return city, province
        return CITIES[0][0], CITIES[0][1]

    def values(self, code: str) -> dict:
        """One customer as validated values (what domain.validate would return)."""
        r = self.rnd
        v: dict = {"country": "IR"}
        city, province = self.city()
        v["city"], v["province"] = city, province
        kind = r.random()
        latin = False
        if kind < 0.12:
            v["type"] = ORGANIZATION
            brand = r.choice(ORG_BRANDS)
            if r.random() < 0.75:
                v["organization_name"] = f"شرکت {r.choice(ORG_KINDS_FA)} {brand[0]}"
            else:
                latin = True
                v["organization_name"] = f"{brand[1]} {r.choice(ORG_KINDS_LA)} Co."
            v["industry"] = r.choice(INDUSTRIES)
            g, f = r.choice(GIVEN), r.choice(FAMILY)
            contact = {
                "contact_id": f"{r.getrandbits(48):012x}",
                "title_prefix": "",
                "given_name": g[1] if latin else g[0],
                "family_name": f[1] if latin else f[0],
                "role": "",
                "org_unit": "",
                "phone": "",
                "mobile": self.mobile(),
                "email": "",
            }
            v["contact_persons"] = [contact]
            slug = brand[1].lower().replace(" ", "")
            v["email"] = f"info@{slug}{r.randrange(1000)}.ir" if r.random() < 0.8 else ""
            v["website"] = ""
        else:
            v["type"] = PERSON
            v["contact_persons"] = []
            x = r.random()
            if x < 0.72:  # Persian, in Persian letters
                g, f = r.choice(GIVEN), r.choice(FAMILY)
                given, family = g[0], f[0]
                if r.random() < 0.08:  # typed on an Arabic keyboard
                    given, family = arabic_letters(given), arabic_letters(family)
                translit = (g[1], f[1])
            elif x < 0.95:  # Persian names in Latin letters
                latin = True
                g, f = r.choice(GIVEN), r.choice(FAMILY)
                given, family = g[1], f[1]
                translit = (given, family)
            else:  # foreign
                latin = True
                given, family = r.choice(_FOREIGN_GIVEN), r.choice(_FOREIGN_FAMILY)
                translit = (given, family)
            v["given_name"], v["family_name"] = given, family
            v["gender"] = r.choice((1, 2))
            if r.random() < 0.7:
                sep = r.choice((".", "_", ""))
                local = _ascii(f"{translit[0]}{sep}{translit[1]}".lower())
                if r.random() < 0.6:
                    local += str(r.randrange(1, 2000))
                v["email"] = f"{local}@{r.choice(MAIL_DOMAINS)}"
            else:
                v["email"] = ""
            v["national_id"] = national_id(r) if r.random() < 0.4 else ""
            if r.random() < 0.3:
                v["birth_date"] = dt.date(1950, 1, 1) + dt.timedelta(days=r.randrange(365 * 55))
        v["mobile"] = self.mobile() if v["type"] == PERSON and r.random() < 0.92 else ""
        v["phone"] = (
            "+98" + AREA_CODES[city] + f"{r.randrange(20_000_000, 99_999_999):08d}"
            if city in AREA_CODES and r.random() < 0.25
            else ""
        )
        v["fax"] = ""
        if r.random() < 0.55:
            if latin:
                v["address"] = f"No. {r.randrange(1, 300)}, {r.choice(STREETS_LA)} St."
            else:
                v["address"] = f"خیابان {r.choice(STREETS_FA)}، کوچه {r.randrange(1, 40)}، پلاک {r.randrange(1, 300)}"
        else:
            v["address"] = ""
        v["postal_code"] = f"{r.randrange(1_000_000_000, 9_999_999_999)}" if r.random() < 0.35 else ""
        v["acquisition_source"] = r.choices(SOURCES, _SOURCE_W)[0]
        t = r.random()
        v["tags"] = [] if t < 0.6 else r.sample(TAGS, 1 if t < 0.9 else 2)
        v["tags"] = [persian.normalize(x) for x in v["tags"]]
        v["lifecycle_stage"] = r.choices((1, 2, 3, 4), (40, 25, 30, 5))[0]
        v["owner"] = r.choice(OWNERS)
        v["display_name"] = domain.display_name(v)
        return v

    def rows(self, n: int, start: dt.datetime, end: dt.datetime, first_number: int = 1) -> Iterator[tuple]:
        """n COPY rows (COLUMNS order) with create_time from start to end, in order."""
        span = (end - start).total_seconds()
        times = sorted(self.rnd.random() * span for _ in range(n))
        for i, sec in enumerate(times):
            code = customer_code(first_number + i)
            v = self.values(code)
            created = start + dt.timedelta(seconds=sec)
            yield (
                code,
                v["type"],
                v.get("given_name", ""),
                v.get("family_name", ""),
                v.get("organization_name", ""),
                v["display_name"],
                v["email"],
                v["phone"],
                v["mobile"],
                v["acquisition_source"],
                created,
                created,
                v.get("gender", 0),
                v["country"],
                v["province"],
                v["city"],
                v["address"],
                v["postal_code"],
                v.get("national_id", ""),
                v.get("birth_date"),
                v.get("industry", ""),
                Jsonb(v["contact_persons"]),
                v["lifecycle_stage"],
                created.date(),
                v["owner"],
                v["tags"],
                domain.search_key(v, code),
            )
