"""campaign-svc: segments, personalised campaigns over e-mail, SMS and messengers, tracking and attribution, consent, the loyalty club"""
